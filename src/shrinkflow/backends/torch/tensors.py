"""Prepared uint8 arrays -> normalized float tensors: the one conversion train and evaluate share.

A whole split is converted once and kept on the device, so the training loop only indexes
tensors: no per-image decoding, no DataLoader workers (the data sets here fit in memory).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError

SPLITS = ("train", "val", "test")


def normalize(
    images_uint8_nhwc: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """uint8 (N, H, W, C) images -> float32 (N, C, H, W) tensor on ``device``, standardized.

    ``mean`` and ``std`` are per channel on the 0..1 scale. The uint8 array is moved first and
    converted on the device, which transfers a quarter of the bytes of a float32 array.
    """
    x = torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def to_device_tensors(
    data: PreparedData, split: str, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (normalized float NCHW) and int64 labels of one split, on ``device``."""
    if split not in SPLITS:
        raise ShrinkflowError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    index = getattr(data, split)
    images = normalize(data.images[index], data.mean, data.std, device)
    labels = torch.from_numpy(np.ascontiguousarray(data.labels[index], dtype=np.int64))
    return images, labels.to(device)
