"""The optimizer and LR schedule of a torch run: SGD with weight decay on conv and linear
weights only, and a linear warm-up from lr/10 followed by a cosine to 0 (or a flat LR), stepped
per iteration. TensorFlow's ``optim.py`` copies both, so the backends optimise alike."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shrinkflow.errors import ShrinkflowError
from shrinkflow.training import WARMUP_START


def sgd(model: nn.Module, t: dict, lr: float, fused: bool = False) -> torch.optim.SGD:
    """SGD over ``model``'s parameters with ``cfg["train"]``'s momentum, Nesterov and weight
    decay (``param_groups``), at peak LR ``lr``; ``fused``: one CUDA kernel per step, which a
    CUDA graph can capture (``cuda_graph``); otherwise torch's default implementation."""
    return torch.optim.SGD(
        param_groups(model, float(t["weight_decay"])),
        lr=lr,
        momentum=float(t["momentum"]),
        nesterov=bool(t["nesterov"]),
        fused=True if fused else None,
    )


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-iteration schedule ``lr_factor`` of ``optimizer``'s peak LR."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(schedule, warmup_steps, total_steps)
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only, not on BN scales/shifts nor biases.

    Decaying BN parameters and biases only shrinks scales the next layer undoes and costs
    accuracy (as in the usual ImageNet/CIFAR recipes). Conv and linear weights are exactly the
    parameters with two or more dimensions.
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per iteration: linear from 1/10 to 1 over the warm-up, then cosine or flat.

    The cosine reaches 0 at ``total_steps``, i.e. just after the last iteration.
    """
    if schedule not in ("cosine", "constant"):
        raise ShrinkflowError(f"train.schedule: {schedule!r} is not cosine or constant")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return WARMUP_START + (1.0 - WARMUP_START) * step / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
