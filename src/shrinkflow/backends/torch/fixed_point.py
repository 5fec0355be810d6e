"""Fixed-point weights for PyTorch: every conv and linear weight stored as ``bits``-bit integers.

A torch wrapper over ``shrinkflow.bitpack`` (the quantization rule, the bit packing and why
this is a storage format): output channels are dim 0 of a conv or linear weight. Biases and
batch-norm tensors stay float32 (a few hundred values per layer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shrinkflow import bitpack

PACKED_FORMAT = "shrinkflow.torch.fixed/1"
QUANTIZED_LAYERS = (nn.Conv2d, nn.Linear)


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)``: int32 codes of ``weight`` and its float32 per-channel (dim 0) scale."""
    codes, scale = bitpack.quantize_channels(weight.detach().float().cpu().numpy(), bits, axis=0)
    return torch.from_numpy(codes), torch.from_numpy(scale)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(
        bitpack.dequantize_channels(codes.cpu().numpy(), scale.cpu().numpy(), axis=0)
    )


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``bitpack.pack`` of a code tensor, as a uint8 tensor."""
    return torch.from_numpy(bitpack.pack(codes.cpu().numpy(), bits))


def unpack(stream: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack``: int32 codes of ``shape``."""
    return torch.from_numpy(bitpack.unpack(stream.cpu().numpy(), bits, shape))


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
