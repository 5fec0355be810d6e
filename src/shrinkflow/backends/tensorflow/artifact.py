"""The model files of a TensorFlow node, and the spec that says what a model expects.

A float node's folder holds ``model.keras`` (Keras' zip format: the architecture as JSON plus
the weights as HDF5; no pickle; checked, then loaded in ``safe_mode``: see ``load_model``) and
``spec.json``; a TFLite node holds ``model.tflite`` (a FlatBuffer) and ``spec.json``; a
fixed-point node ``model.fixed.npz`` (bit-packed weights, see ``fixed_point``) and
``spec.json``. The spec has the keys of the torch backend's (``arch``, ``num_classes``,
``in_channels``, ``image_size``, ``mean``, ``std``, ``classes``) plus ``format``. Sizes are
measured on the model file alone: the spec is bookkeeping, and the model already normalises
its own input.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import io  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow import fixed_point  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.nodes import check_artifact  # noqa: E402
from shrinkflow.outputs import read_json, write_json  # noqa: E402

KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
FIXED_FILE = "model.fixed.npz"  # written by save_fixed_point
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
    try:
        spec = read_json(path)
    except (OSError, ValueError) as exc:
        raise ShrinkflowError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else None
        raise ShrinkflowError(f"{path}: format {found!r} is not {FORMAT!r}")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ShrinkflowError(f"{path}: model spec lacks {', '.join(missing)}")
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

    Keras alone is not enough to load a file from elsewhere without running code from it: a
    legacy HDF5 file named ``model.keras`` bypasses ``safe_mode`` (its Lambda layers' bytecode
    runs), and a config may name any importable module and class, which Keras imports and
    calls. So the file is read once, must be Keras' zip format with exactly its three members,
    and its config may name only the layers shrinkflow's models are built from
    (``check_keras_config``); Keras then loads those same bytes, in safe mode.
    """
    if (Path(folder) / FIXED_FILE).is_file():
        return load_fixed_point(folder)
    spec = read_spec(folder)
    path = Path(folder) / KERAS_FILE
    if not path.is_file():
        raise ShrinkflowError(f"{folder}: no {KERAS_FILE} (a TFLite node is not a Keras model)")
    try:
        data = path.read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = sorted(archive.namelist())
            if members != sorted(KERAS_MEMBERS):
                raise ShrinkflowError(
                    f"{path}: not a Keras model archive (holds {', '.join(members[:4])}; "
                    f"expected {', '.join(KERAS_MEMBERS)})"
                )
            config = json.loads(archive.read("config.json"))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShrinkflowError(f"{path}: not a readable Keras model ({reason})") from None
    check_keras_config(path, config, spec["arch"])
    check_artifact(Path(folder), backend="tensorflow", arch=spec["arch"], kind="float")
    with tempfile.TemporaryDirectory(prefix="shrinkflow-keras-") as scratch:
        checked = Path(scratch) / KERAS_FILE
        checked.write_bytes(data)  # what was checked is what Keras loads
        try:
            model = keras.models.load_model(checked, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many kinds for a damaged file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ShrinkflowError(f"{path}: not a readable Keras model ({reason})") from None
    return model, spec


def save_fixed_point(model: keras.Model, spec: dict[str, Any], bits: int, folder: Path) -> Path:
    """Write ``model`` with ``bits``-bit kernels (see ``fixed_point``) to
    ``folder/model.fixed.npz`` (plus the spec) and return the file's path."""
    path = Path(folder) / FIXED_FILE
    np.savez(path, **fixed_point.pack_weights(model, bits))
    write_spec(spec, folder)
    return path


def load_fixed_point(folder: Path) -> tuple[keras.Model, dict[str, Any]]:
    """The float model a fixed-point file describes (kernels ``code * scale``) and its spec."""
    spec = read_spec(folder)
    path = Path(folder) / FIXED_FILE
    if not path.is_file():
        raise ShrinkflowError(f"{folder}: no {FIXED_FILE} (not a fixed-point TensorFlow node)")
    if not zipfile.is_zipfile(path):  # np.load would read a lone .npy array, or a pickle
        raise ShrinkflowError(f"{path}: not a readable fixed-point model (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShrinkflowError(f"{path}: not a readable fixed-point model ({reason})") from None
    tag = arrays.pop("format", None)
    if tag is None or tag.shape != () or tag.item() != fixed_point.PACKED_FORMAT.encode():
        raise ShrinkflowError(
            f"{path}: not a {fixed_point.PACKED_FORMAT} file (no such format tag)"
        )
    try:
        architecture = json.loads(arrays.pop("architecture").item().decode())
        bits = int(arrays["bits"])
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ShrinkflowError(
            f"{path}: no readable architecture and bit width ({reason})"
        ) from None
    # Keras' JSON deserializer imports and calls what a config names: plain layers only.
    check_keras_config(path, architecture, spec["arch"])
    check_artifact(Path(folder), backend="tensorflow", arch=spec["arch"], kind="fixed", bits=bits)
    try:
        model = keras.models.model_from_json(json.dumps(architecture))
        model.set_weights(fixed_point.unpack_weights(arrays, len(model.weights)))
    except Exception as exc:  # Keras and a damaged archive raise many kinds
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ShrinkflowError(f"{path}: weights do not describe a model ({reason})") from None
    return model, spec


# The members of a ``.keras`` archive: nothing else is loaded (no assets, no HDF5 file).
KERAS_MEMBERS = ("config.json", "metadata.json", "model.weights.h5")
# The Keras classes shrinkflow's models are built from, by the module a config names them
# under. Layers that run stored Python or TensorFlow functions (Lambda, TFOpLambda,
# SlicingOpLambda) and classes or functions of any other module are refused before Keras sees
# the config: Keras would import the named module and call what it names.
_LAYERS = frozenset(
    """InputLayer Rescaling Normalization Conv2D DepthwiseConv2D SeparableConv2D Dense
    BatchNormalization ReLU Activation Add Concatenate Multiply Average Maximum ZeroPadding2D
    MaxPooling2D AveragePooling2D GlobalAveragePooling2D GlobalMaxPooling2D Flatten Dropout
    Reshape Softmax""".split()  # noqa: SIM905
)
_MODELS = frozenset({"Functional", "Sequential", "Model"})
_DATA_MODULES = ("keras.initializers", "keras.regularizers", "keras.constraints")
_ACTIVATIONS = frozenset(
    """linear relu relu6 softmax sigmoid hard_sigmoid tanh swish silu gelu elu selu softplus
    softsign exponential""".split()  # noqa: SIM905
)


def check_keras_config(path: Path, config: Any, arch: str | None = None) -> None:
    """Refuse a Keras model config (``.keras`` config.json, or ``model.to_json()``) that names
    anything but plain layers, initializers and activations; with ``arch``, also one whose
    model is not that registry model (shrinkflow names every Keras model after its arch)."""
    if not isinstance(config, dict) or config.get("class_name") not in _MODELS:
        raise ShrinkflowError(f"{path}: the Keras config is not a model")
    stack: list[Any] = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        if "class_name" in item and not _allowed_class(item):
            module, cls = item.get("module"), str(item["class_name"])[:80]
            shown = f"a {cls} layer"
            if module not in (None, "keras.layers"):
                shown = f"Keras object {str(module)[:80]}.{cls}"
            raise ShrinkflowError(
                f"{path}: refusing {shown} (a model file may hold plain layers only; loading "
                "this one could run code)"
            )
        for key in ("activation", "recurrent_activation"):
            value = item.get(key)
            if isinstance(value, str) and value not in _ACTIVATIONS:
                raise ShrinkflowError(f"{path}: refusing activation {value[:80]!r}")
        stack.extend(item.values())
    name = (config.get("config") or {}).get("name")
    if arch is not None and name != arch:
        raise ShrinkflowError(f"{path}: holds a Keras model named {name!r}, its spec says {arch}")


def _allowed_class(item: dict) -> bool:
    cls, module = item.get("class_name"), item.get("module")
    registered = item.get("registered_name")
    if not isinstance(cls, str) or registered not in (None, cls):
        return False
    if module is None or module == "keras.layers":
        return cls in _LAYERS or (module is None and cls in _MODELS)
    if module in _DATA_MODULES:
        return cls.isidentifier() and cls[0].isupper()
    if module.startswith("tf_keras.src.engine."):
        return cls in _MODELS
    return False


def model_file(folder: Path) -> Path:
    """The deployable file of a TensorFlow node: its ``.tflite`` or fixed-point file if it has
    one, else its ``.keras``."""
    for name in (TFLITE_FILE, FIXED_FILE):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return Path(folder) / KERAS_FILE
