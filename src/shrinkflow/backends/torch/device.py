"""Where a torch run trains and how exactly: the device, deterministic kernels on CPU, and its
fast path on CUDA (``train.precision``, ``train.compile``)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say
from shrinkflow.training.fast_path import FastPath, resolve

AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def fast_path(t: dict, dev: torch.device, world: int = 1) -> FastPath:
    """``train.precision`` and ``train.compile`` on ``dev`` (``training.fast_path.resolve``).

    Compiling means capturing the training step as one CUDA graph (``cuda_graph.GraphStep``),
    so it needs CUDA and a step without host syncs: it is off under float16, whose GradScaler
    reads its overflow check on the host every step, and in data-parallel training
    (``world`` > 1), where DDP's gradient hooks step eagerly.
    """
    cuda = dev.type == "cuda"
    bfloat16 = cuda and torch.cuda.get_device_capability(dev) >= (8, 0)
    path = resolve(t, gpu=cuda, bfloat16=bfloat16, compile_on_cpu=False)
    why = None
    if path.compile and path.precision == "float16":
        why = "under float16 (GradScaler syncs the host every step; bfloat16 needs no scaler)"
    elif path.compile and world > 1:
        why = "in data-parallel training (DDP steps eagerly)"
    if why is None:
        return path
    say(f"train.compile: off {why}")
    return dataclasses.replace(path, compile=False)


def autocast(
    dtype: torch.dtype | None, dev: torch.device
) -> contextlib.AbstractContextManager[None]:
    """Autocast to ``dtype`` on ``dev``, or nothing for None (float32).

    Without autocast's cache of cast weights, which PyTorch's CUDA graph notes rule out for a
    captured step (the cache's tensors would outlive the capture); a step uses each weight once,
    so the cache saves nothing here anyway.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype, cache_enabled=False)
