"""The model files of a TensorFlow node, and the spec that says what a model expects.

A float node's folder holds ``model.keras`` (Keras' zip format: the architecture as JSON plus
the weights as HDF5; no pickle, loaded with ``safe_mode``) and ``spec.json``; a TFLite node holds
``model.tflite`` (a FlatBuffer) and ``spec.json``; a fixed-point node ``model.fixed.npz``
(bit-packed weights, see ``fixed_point``) and ``spec.json``. The spec has the keys of the torch
backend's (``arch``, ``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std``,
``classes``) plus ``format``. Sizes are measured on the model file alone: the spec is
bookkeeping, and the model already normalises its own input.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import tf_keras as keras  # noqa: E402

from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.outputs import read_json, write_json  # noqa: E402

KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
FIXED_FILE = "model.fixed.npz"  # written by fixed_point.save_fixed_point
SPEC_FILE = "spec.json"
FORMAT = "shrinkflow.tensorflow/1"
SPEC_KEYS = ("arch", "num_classes", "in_channels", "image_size", "mean", "std", "classes")


def write_spec(spec: dict[str, Any], folder: Path) -> None:
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"model spec lacks {', '.join(missing)}")
    write_json(Path(folder) / SPEC_FILE, {"format": FORMAT, **spec})


def read_spec(folder: Path) -> dict[str, Any]:
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise ShrinkflowError(f"{folder}: no {SPEC_FILE} (not a TensorFlow model folder)")
    spec = read_json(path)
    if spec.get("format") != FORMAT:
        raise ShrinkflowError(f"{path}: format {spec.get('format')!r} is not {FORMAT!r}")
    return spec


def save_model(model: keras.Model, spec: dict[str, Any], folder: Path) -> Path:
    """Write ``model`` (weights and architecture, no optimizer) and ``spec`` into ``folder``."""
    path = Path(folder) / KERAS_FILE
    # The .keras format stores a compiled model's optimizer state too, which a deployed model
    # does not need: save an uncompiled copy of the same graph and weights.
    clean = keras.Model.from_config(model.get_config())
    clean.set_weights(model.get_weights())
    clean.save(path)
    write_spec(spec, folder)
    return path


def load_model(folder: Path) -> tuple[keras.Model, dict[str, Any]]:
    """The Keras model saved in ``folder`` and its spec; a one-line error if it is not one.

    A fixed-point node loads as the Keras model with its weights expanded to float.
    """
    if (Path(folder) / FIXED_FILE).is_file():
        from shrinkflow.backends.tensorflow.fixed_point import load_fixed_point

        return load_fixed_point(folder)
    spec = read_spec(folder)
    path = Path(folder) / KERAS_FILE
    if not path.is_file():
        raise ShrinkflowError(f"{folder}: no {KERAS_FILE} (a TFLite node is not a Keras model)")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many kinds for a damaged file
        raise ShrinkflowError(f"{path}: not a readable Keras model ({exc})") from exc
    return model, spec


def model_file(folder: Path) -> Path:
    """The deployable file of a TensorFlow node: its ``.tflite`` or fixed-point file if it has
    one, else its ``.keras``."""
    for name in (TFLITE_FILE, FIXED_FILE):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return Path(folder) / KERAS_FILE
