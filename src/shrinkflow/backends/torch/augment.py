"""A torch run's batches: each epoch's order and augmentation (random crop of the black-padded
image, optional horizontal flip), drawn from the run's CPU generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shrinkflow.training import CROP_PAD_DIVISOR


@dataclass
class Augment:
    """Random crop of the zero-padded image (``pad`` pixels) and optional horizontal flip."""

    enabled: bool
    hflip: bool
    pad: int
    fill: torch.Tensor  # per channel, the normalized value of the padding

    @classmethod
    def of(cls, t: dict, image_size: int, mean: Any, std: Any, dev: torch.device) -> Augment:
        """The augmentation ``cfg["train"]`` asks for, for images of ``image_size``."""
        return cls(
            enabled=bool(t["augment"]),
            hflip=bool(t["hflip"]),
            pad=image_size // CROP_PAD_DIVISOR,
            fill=black(mean, std, dev),
        )

    def draw(
        self, n: int, generator: torch.Generator, dev: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An epoch's order, crop offsets and flips of ``n`` images, all drawn up front from
        ``generator`` (whatever ``enabled``: the draws are the same with or without) and moved
        to ``dev`` in one transfer each."""
        order = torch.randperm(n, generator=generator)
        shifts = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        return order.to(dev), shifts.to(dev), flips.to(dev)

    def __call__(self, x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        x = random_crop(x, shifts, self.pad, self.fill)
        if self.hflip:
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
        return x


def black(mean: Any, std: Any, dev: torch.device) -> torch.Tensor:
    """The normalized value of a black pixel: padding is black before normalization, as in
    torchvision's RandomCrop(padding=4) followed by Normalize."""
    m = torch.tensor(mean, dtype=torch.float32, device=dev)
    s = torch.tensor(std, dtype=torch.float32, device=dev)
    return (-m / s).view(1, -1, 1, 1)


def random_crop(
    x: torch.Tensor, shifts: torch.Tensor, pad: int, fill: torch.Tensor
) -> torch.Tensor:
    """Per-image random crop of the ``pad``-padded batch back to its size, by two gathers."""
    if pad == 0:
        return x
    b, c, h, w = x.shape
    padded = fill.expand(b, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad : pad + h, pad : pad + w] = x
    rows = shifts[:, 0:1] + torch.arange(h, device=x.device)  # (B, H) rows to keep
    cols = shifts[:, 1:2] + torch.arange(w, device=x.device)  # (B, W) columns to keep
    out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pad))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))
