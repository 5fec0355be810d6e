"""Fixed-point weights for TensorFlow: every Conv2D and Dense kernel stored as ``bits``-bit codes.

A Keras wrapper over ``shrinkflow.bitpack`` (the quantization rule, the bit packing and why
this is a storage format): one scale per output channel, the kernel's last axis in Keras'
layout. Every other weight (biases, batch norm, the input normalisation's statistics) keeps its
own dtype.

``pack_weights`` returns the arrays of ``model.fixed.npz`` (``artifact.save_fixed_point``
writes them as one uncompressed ``np.savez`` archive, so its size shows the packing itself
rather than zlib's): the format tag and the architecture (``model.to_json()``) as UTF-8 byte
strings, the bit width, and per weight of ``model.weights`` either ``w<i>.codes`` /
``w<i>.scale`` / ``w<i>.shape`` or ``w<i>.value``. Nothing in it is an object array, so it loads
with ``allow_pickle=False``; ``artifact.load_fixed_point`` checks the architecture (plain layers
only, ``artifact.check_keras_config``) before Keras' deserializer rebuilds it in its default
safe mode, so opening the file runs no code from it, and expands the codes to float32
``code * scale`` (``unpack_weights``): the model runs float kernels.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow import bitpack  # noqa: E402

PACKED_FORMAT = "shrinkflow.tensorflow.fixed/1"
QUANTIZED_LAYERS = (keras.layers.Conv2D, keras.layers.Dense)
CHANNEL_AXIS = -1  # Keras kernels: (kh, kw, in, out) and (in, out)


def quantized_kernels(model: keras.Model) -> list[Any]:
    """The kernel variables of ``model``'s Conv2D and Dense layers, in layer order."""
    return [layer.kernel for layer in model.layers if isinstance(layer, QUANTIZED_LAYERS)]


def pack_weights(model: keras.Model, bits: int) -> dict[str, np.ndarray]:
    """The arrays of a fixed-point model file: ``model`` with ``bits``-bit kernels."""
    kernels = {id(k) for k in quantized_kernels(model)}
    arrays: dict[str, np.ndarray] = {
        "format": np.array(PACKED_FORMAT.encode()),
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
    return arrays


def unpack_weights(arrays: dict[str, np.ndarray], count: int) -> list[np.ndarray]:
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
