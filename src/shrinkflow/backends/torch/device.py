"""Where a torch run trains and how exactly: the device, deterministic kernels on CPU, and
whether it trains in mixed precision."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say


def resolve_device(name: str) -> torch.device:
    """The torch.device for "auto" (CUDA if available, else CPU), "cpu" or "cuda[:n]"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ShrinkflowError(f"device {name!r} is not auto, cpu or cuda[:n]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ShrinkflowError(f"device {name!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ShrinkflowError(f"device {name!r} is not auto, cpu or cuda[:n]")
    return dev


@contextmanager
def deterministic_on_cpu(dev: torch.device) -> Iterator[None]:
    """Deterministic kernels while training on CPU, where they cost nothing; then torch's
    previous setting. CUDA runs keep torch's defaults: deterministic GPU convolutions are slow,
    so a GPU run repeats its init and batch order but not every bit."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def mixed_precision(t: dict, dev: torch.device) -> bool:
    """Whether to train in float16 autocast: asked for (``train.mixed_precision``), and CUDA to
    run it on."""
    amp = bool(t["mixed_precision"]) and dev.type == "cuda"
    if t["mixed_precision"] and not amp:
        say("train.mixed_precision: ignored on CPU (float16 autocast needs CUDA)")
    return amp
