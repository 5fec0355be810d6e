"""Fixed-point weights as numpy arrays: per-channel symmetric quantization and bit packing.

The framework-free half of the ``fixed_w<bits>`` method, shared by both backends (each
backend's ``fixed_point`` module wraps it for its tensors and its file format).

Symmetric and per output channel, with the restricted range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``:
zero stays exactly zero (a pruned weight stays pruned), the largest magnitude of each channel
is represented exactly, and 2 bits gives the ternary {-s, 0, +s}. The codes are bit-packed,
so a 4-bit file holds half a byte per weight.

No x86 kernel computes with 2..7-bit or 9..16-bit weights, so this is a storage format, as in
the reference study's fixed-point sweep: a loader expands the codes to float weights
(``code * scale``, exact in float32) and the model runs float kernels.
"""

from __future__ import annotations

import numpy as np

from shrinkflow.quantization import MAX_BITS, MIN_BITS


def code_limit(bits: int) -> int:
    """The largest code magnitude of ``bits``-bit restricted-range codes."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"fixed-point widths are {MIN_BITS}..{MAX_BITS} bits, not {bits}")
    return 2 ** (bits - 1) - 1


def _channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """The shape that broadcasts one value per channel of ``axis`` over an ``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def quantize_channels(weight: np.ndarray, bits: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scale)``: int32 codes of ``weight`` (its shape) and the float32 scale of each
    channel along ``axis`` (torch's output channels are axis 0, Keras' the last axis)."""
    limit = code_limit(bits)
    w = np.asarray(weight, dtype=np.float32)
    channels = np.moveaxis(w, axis, 0)
    peak = np.abs(channels).reshape(len(channels), -1).max(axis=1)
    # An all-zero channel (pruned away) keeps scale 1: its codes are 0 whatever the scale.
    scale = np.where(peak > 0, peak / np.float32(limit), np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.round(w / scale.reshape(_channel_shape(w.ndim, axis))), -limit, limit)
    return codes.astype(np.int32), scale


def dequantize_channels(codes: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """float32 ``code * scale``, the scale of each channel along ``axis``."""
    return codes.astype(np.float32) * scale.reshape(_channel_shape(codes.ndim, axis))


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes in ``[-(2^(b-1)-1), 2^(b-1)-1]`` as a uint8 bit stream, ``bits`` bits per code.

    Code ``i``'s bit ``b`` (least significant first) is bit ``i * bits + b`` of the stream,
    numbered from the most significant bit of byte 0 (``np.packbits``' order).
    """
    offset = code_limit(bits)
    unsigned = (codes.reshape(-1).astype(np.int64) + offset).astype(np.uint32)
    planes = (unsigned[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1))


def unpack(stream: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``pack``: int32 codes of ``shape``."""
    count = int(np.prod(shape))
    planes = np.unpackbits(stream)[: count * bits].reshape(count, bits)
    unsigned = planes.astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
    return (unsigned - code_limit(bits)).astype(np.int32).reshape(shape)
