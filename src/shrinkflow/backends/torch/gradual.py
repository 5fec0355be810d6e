"""Gradual magnitude pruning during training: the sparsity schedules and the step hook.

Zhu & Gupta (2017), "To prune, or not to prune": from step ``begin`` the sparsity rises from
s_i to s_f along s_t = s_f + (s_i - s_f) (1 - (t - begin) / (end - begin))^3, recomputing the
magnitude masks every ``frequency`` steps, fast at first while many weights are redundant and
slowly near the target; tfmot's ``PolynomialDecay(power=3)`` is the same schedule. The constant
schedule (tfmot's ``ConstantSparsity``) prunes to s_f at ``begin`` and holds it: the control.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shrinkflow.backends.torch.prune_unstructured import (
    apply_masks,
    check_scope,
    check_sparsity,
    layer_masks,
    prunable_modules,
)
from shrinkflow.errors import ShrinkflowError

SCHEDULES = ("polynomial", "constant")


def polynomial_sparsity(step: int, begin: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta's cubic schedule: 0 before ``begin`` (no pruning yet), ``initial`` at
    ``begin``, ``final`` from ``end`` on."""
    if step < begin:
        return 0.0
    if step >= end:
        return final
    remaining = 1.0 - (step - begin) / (end - begin)
    return final + (initial - final) * remaining**3


def constant_sparsity(step: int, begin: int, final: float) -> float:
    """0 before ``begin``, then ``final``."""
    return final if step >= begin else 0.0


def schedule_steps(total_steps: int, begin_fraction: float, end_fraction: float) -> tuple[int, int]:
    """The (begin, end) steps, 1-based, of fractions of a run of ``total_steps`` optimizer steps.

    Rounded to the nearest step; pruning starts at step 1 at the earliest (after the first
    optimizer step) and ends no earlier than it starts.
    """
    if begin_fraction >= end_fraction:
        raise ShrinkflowError(
            f"prune.gradual.begin_fraction: {begin_fraction} is not below "
            f"end_fraction {end_fraction}"
        )
    begin = max(1, round(begin_fraction * total_steps))
    return begin, max(begin, round(end_fraction * total_steps))


class GradualPruner:
    """A ``train.fit`` step hook that prunes ``model`` on a schedule.

    At every update step (``begin``, then every ``frequency`` steps, and always at ``end`` so
    that the target is reached even when ``frequency`` exceeds the pruning span) the magnitude
    masks are recomputed at the scheduled sparsity. After EVERY step the current masks are
    re-applied, so pruned weights stay exactly zero although momentum and weight decay would
    move them. Pruned weights are zero, hence the smallest, so a later update at a higher
    sparsity keeps them pruned: the masks only grow.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: str,
        final: float,
        total_steps: int,
        cfg_gradual: dict[str, Any],
        scope: str,
        exclude: list[str],
    ) -> None:
        """Set up the schedule; nothing is pruned before ``begin``.

        Args:
            schedule: "polynomial" or "constant".
            final: the target sparsity s_f.
            total_steps: optimizer steps of the whole run (epochs x steps per epoch).
            cfg_gradual: ``prune.gradual`` (begin_fraction, end_fraction, frequency,
                initial_sparsity).
            scope, exclude: as in ``prune_unstructured.magnitude_masks``.
        """
        if schedule not in SCHEDULES:
            raise ShrinkflowError(
                f"prune.methods: gradual schedule {schedule!r} is not one of {', '.join(SCHEDULES)}"
            )
        check_sparsity(final)
        check_scope(scope)
        initial = float(cfg_gradual["initial_sparsity"])
        if schedule == "polynomial" and initial > final:
            raise ShrinkflowError(
                f"prune.gradual.initial_sparsity: {initial} is above the target sparsity {final}"
            )
        self.model, self.schedule, self.final, self.initial = model, schedule, final, initial
        self.scope, self.modules = scope, prunable_modules(model, exclude)
        self.frequency = int(cfg_gradual["frequency"])
        self.begin, self.end = schedule_steps(
            total_steps, float(cfg_gradual["begin_fraction"]), float(cfg_gradual["end_fraction"])
        )
        self.masks: dict[str, torch.Tensor] | None = None
        self.sparsity = 0.0  # the sparsity the current masks were computed for

    def target(self, step: int) -> float:
        """The scheduled sparsity at ``step``."""
        if self.schedule == "polynomial":
            return polynomial_sparsity(step, self.begin, self.end, self.initial, self.final)
        return constant_sparsity(step, self.begin, self.final)

    def is_update(self, step: int) -> bool:
        """Whether the masks are recomputed after ``step``."""
        in_span = self.begin <= step <= self.end
        return in_span and ((step - self.begin) % self.frequency == 0 or step == self.end)

    def __call__(self, step: int) -> None:
        if self.is_update(step):
            self.sparsity = self.target(step)
            self.masks = layer_masks(self.modules, self.sparsity, self.scope)
        if self.masks is not None:
            apply_masks(self.model, self.masks)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks or {}, "sparsity": self.sparsity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = dict(state["masks"]) or None
        self.sparsity = float(state["sparsity"])
