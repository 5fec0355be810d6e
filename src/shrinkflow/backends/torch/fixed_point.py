"""Fixed-point weights: every conv and linear weight stored as ``bits``-bit integers.

Symmetric and per output channel, with the restricted range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``:
zero stays exactly zero (a pruned weight stays pruned), the largest magnitude of each channel
is represented exactly, and 2 bits gives the ternary {-s, 0, +s}. The codes are bit-packed,
so a 4-bit file holds half a byte per weight; biases and batch-norm tensors stay float32 (a
few hundred values per layer).

No x86 kernel computes with 2..7-bit or 9..16-bit weights, so this is a storage format, as in
the reference study's fixed-point sweep: the loader expands the codes to float weights
(``code * scale``, exact in float32) and the model runs float kernels. Its accuracy is the
accuracy of those weights; its latency is the float model's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

PACKED_FORMAT = "shrinkflow.torch.fixed/1"
QUANTIZED_LAYERS = (nn.Conv2d, nn.Linear)


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)``: int32 codes of ``weight`` and its float32 per-channel (dim 0) scale."""
    limit = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    peak = w.abs().reshape(len(w), -1).amax(dim=1)
    # An all-zero channel (pruned away) keeps scale 1: its codes are 0 whatever the scale.
    scale = torch.where(peak > 0, peak / limit, torch.ones_like(peak))
    shape = (-1,) + (1,) * (w.ndim - 1)
    codes = torch.round(w / scale.view(shape)).clamp_(-limit, limit).to(torch.int32)
    return codes, scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (codes.ndim - 1)
    return codes.float() * scale.view(shape)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in ``[-(2^(b-1)-1), 2^(b-1)-1]`` as a uint8 bit stream, ``bits`` bits per code."""
    offset = 2 ** (bits - 1) - 1
    unsigned = (codes.reshape(-1).numpy().astype(np.int64) + offset).astype(np.uint32)
    planes = (unsigned[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return torch.from_numpy(np.packbits(planes.astype(np.uint8).reshape(-1)))


def unpack(stream: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack``: int32 codes of ``shape``."""
    count = int(np.prod(shape))
    planes = np.unpackbits(stream.numpy())[: count * bits].reshape(count, bits)
    unsigned = planes.astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
    offset = 2 ** (bits - 1) - 1
    return torch.from_numpy((unsigned - offset).astype(np.int32)).reshape(shape)


def quantized_weight_names(model: nn.Module) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]


def pack_state(model: nn.Module, bits: int) -> dict[str, Any]:
    """The payload of a fixed-point model file: packed conv/linear weights, other tensors."""
    names = set(quantized_weight_names(model))
    packed, rest = {}, {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if key in names:
            codes, scale = quantize_weight(tensor, bits)
            packed[key] = {"shape": list(tensor.shape), "scale": scale, "codes": pack(codes, bits)}
        else:
            rest[key] = tensor
    return {"bits": bits, "packed": packed, "state_dict": rest}


def unpack_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A float state dict from ``pack_state``'s payload (weights expanded to code * scale)."""
    bits = int(payload["bits"])
    state = dict(payload["state_dict"])
    for key, entry in payload["packed"].items():
        codes = unpack(entry["codes"], bits, tuple(entry["shape"]))
        state[key] = dequantize_weight(codes, entry["scale"])
    return state
