"""Fixed-point weights for TensorFlow (``quantize.methods: fixed_w<bits>``).

Every Conv2D and Dense kernel is stored as ``bits``-bit codes with one scale per output channel
(the kernel's last axis in Keras' layout), bit-packed by ``shrinkflow.bitpack`` (the
quantization rule and why this is a storage format are described there); every other weight
(biases, batch norm, the input normalisation's statistics) keeps its own dtype.

``model.fixed.npz`` is one uncompressed ``np.savez`` archive, so its size shows the packing
itself rather than zlib's: the format tag and the architecture (``model.to_json()``) as UTF-8
byte strings, the bit width, and per weight of ``model.weights`` either ``w<i>.codes`` /
``w<i>.scale`` / ``w<i>.shape`` or ``w<i>.value``. Nothing in it is an object array, so it loads
with ``allow_pickle=False``; the architecture may name plain layers only
(``artifact.check_keras_config``) and is rebuilt by Keras' deserializer in its default safe
mode: opening the file runs no code from it. The loader expands the codes to float32
``code * scale``, and the model runs float kernels.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import json  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow import bitpack  # noqa: E402
from shrinkflow.backends.tensorflow import artifact  # noqa: E402
from shrinkflow.data.prepared import PreparedData, check_fits  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.metrics import topk_accuracy  # noqa: E402
from shrinkflow.nodes import check_artifact  # noqa: E402

FIXED_FILE = "model.fixed.npz"
FORMAT = "shrinkflow.tensorflow.fixed/1"
QUANTIZED_LAYERS = (keras.layers.Conv2D, keras.layers.Dense)
CHANNEL_AXIS = -1  # Keras kernels: (kh, kw, in, out) and (in, out)


def quantized_kernels(model: keras.Model) -> list[Any]:
    """The kernel variables of ``model``'s Conv2D and Dense layers, in layer order."""
    return [layer.kernel for layer in model.layers if isinstance(layer, QUANTIZED_LAYERS)]


def save_fixed_point(model: keras.Model, spec: dict[str, Any], bits: int, folder: Path) -> Path:
    """Write ``model`` with ``bits``-bit kernels to ``folder/model.fixed.npz`` (plus the spec)
    and return the file's path."""
    kernels = {id(k) for k in quantized_kernels(model)}
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT.encode()),
        # UTF-8 bytes: a numpy unicode array spends 4 bytes per character.
        "architecture": np.array(model.to_json().encode()),
        "bits": np.array(bits, dtype=np.int64),
    }
    for i, variable in enumerate(model.weights):
        value = variable.numpy()
        if id(variable) in kernels:
            codes, scale = bitpack.quantize_channels(value, bits, CHANNEL_AXIS)
            arrays[f"w{i}.codes"] = bitpack.pack(codes, bits)
            arrays[f"w{i}.scale"] = scale
            arrays[f"w{i}.shape"] = np.array(value.shape, dtype=np.int64)
        else:
            arrays[f"w{i}.value"] = value
    path = Path(folder) / FIXED_FILE
    np.savez(path, **arrays)
    artifact.write_spec(spec, folder)
    return path


def load_fixed_point(folder: Path) -> tuple[keras.Model, dict[str, Any]]:
    """The float model a fixed-point file describes (kernels ``code * scale``) and its spec."""
    spec = artifact.read_spec(folder)
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
    if tag is None or tag.shape != () or tag.item() != FORMAT.encode():
        raise ShrinkflowError(f"{path}: not a {FORMAT} file (no such format tag)")
    try:
        architecture = json.loads(arrays.pop("architecture").item().decode())
        bits = int(arrays["bits"])
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ShrinkflowError(
            f"{path}: no readable architecture and bit width ({reason})"
        ) from None
    # Keras' JSON deserializer imports and calls what a config names: plain layers only.
    artifact.check_keras_config(path, architecture, spec["arch"])
    check_artifact(Path(folder), backend="tensorflow", arch=spec["arch"], kind="fixed", bits=bits)
    try:
        model = keras.models.model_from_json(json.dumps(architecture))
        model.set_weights(_expand(arrays, len(model.weights)))
    except Exception as exc:  # Keras and a damaged archive raise many kinds
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ShrinkflowError(f"{path}: weights do not describe a model ({reason})") from None
    return model, spec


def _expand(arrays: dict[str, np.ndarray], count: int) -> list[np.ndarray]:
    """The ``count`` weights stored in ``arrays``, codes expanded to float32 ``code * scale``."""
    bits = int(arrays.pop("bits"))
    values = []
    for i in range(count):
        if f"w{i}.value" in arrays:
            values.append(arrays.pop(f"w{i}.value"))
            continue
        shape = tuple(int(n) for n in arrays.pop(f"w{i}.shape"))
        codes = bitpack.unpack(arrays.pop(f"w{i}.codes"), bits, shape)
        values.append(bitpack.dequantize_channels(codes, arrays.pop(f"w{i}.scale"), CHANNEL_AXIS))
    if arrays:
        raise ValueError(f"{len(arrays)} array(s) left over, first {next(iter(arrays))!r}")
    return values


def quantize_fixed(
    cfg: dict, bits: int, model_dir: Path, data: PreparedData, out_dir: Path
) -> dict[str, float | int | str]:
    """Store the float model in ``model_dir`` with ``bits``-bit kernels in ``out_dir``.

    Returns the torch backend's facts: the artefact's file name, ``bits``, the layers
    quantized, the val top-1 of the model reloaded from the written file, and the seconds taken.
    """
    started = time.perf_counter()
    model, spec = artifact.load_model(model_dir)  # validates the input before anything is written
    check_fits(spec, data, artifact.model_file(model_dir))
    save_fixed_point(model, spec, bits, Path(out_dir))
    reloaded, _ = load_fixed_point(Path(out_dir))
    return {
        "artifact": FIXED_FILE,
        "bits": bits,
        "quantized_layers": len(quantized_kernels(model)),
        "val_top1": _val_top1(reloaded, data, int(cfg["train"]["batch_size"])),
        "seconds": time.perf_counter() - started,
    }


def _val_top1(model: keras.Model, data: PreparedData, batch_size: int) -> float:
    """Top-1 on the val split (NaN when it is empty); the model takes raw 0..255 pixels."""
    index = np.asarray(data.val)
    if len(index) == 0:
        return float("nan")
    # Eager calls: one pass over the split does not repay tracing a graph (Model.predict).
    logits = [
        model(data.images[index[i : i + batch_size]].astype(np.float32), training=False)
        for i in range(0, len(index), batch_size)
    ]
    return topk_accuracy(np.concatenate(logits), data.labels[index], (1,))[1]
