"""`shrinkflow prune` for ``gradual_polynomial`` and ``gradual_constant``: magnitude pruning
during re-training. The sparsity schedules, the step hook and the prune job.

Zhu & Gupta (2017), "To prune, or not to prune": from step ``begin`` the sparsity rises from
s_i to s_f along s_t = s_f + (s_i - s_f) (1 - (t - begin) / (end - begin))^3, recomputing the
magnitude masks every ``frequency`` steps, fast at first while many weights are redundant and
slowly near the target; tfmot's ``PolynomialDecay(power=3)`` is the same schedule. The constant
schedule (tfmot's ``ConstantSparsity``) prunes to s_f at ``begin`` and holds it: the control.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrinkflow.backends.base import JobContext, check_scope, check_sparsity
from shrinkflow.backends.torch.artifact import load_model
from shrinkflow.backends.torch.device import resolve_device
from shrinkflow.backends.torch.prune_unstructured import (
    apply_masks,
    layer_masks,
    prunable_modules,
    saved_facts,
)
from shrinkflow.backends.torch.resume_state import job_fingerprint
from shrinkflow.backends.torch.train import fit
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError
from shrinkflow.training import steps_per_epoch

METHODS = ("gradual_polynomial", "gradual_constant")
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


def gradual_fingerprint(
    cfg: dict, method: str, sparsity: float, model_dir: Path, data: PreparedData
) -> str:
    """Hash of what decides a gradual run (the stage table's keys for this method's family, so
    adding a value to the sweep lists does not discard the resume states of other branches)."""
    point = {"method": method, "sparsity": float(sparsity)}
    return job_fingerprint("prune", cfg, point, data, model_dir)


def prune_gradually(
    cfg: dict,
    method: str,
    sparsity: float,
    model_dir: Path,
    data: PreparedData,
    context: JobContext,
    sensitivity_dir: Path | None = None,
) -> dict[str, float | int]:
    """Re-train the model in ``model_dir`` while ``method``'s schedule prunes it to
    ``sparsity``; save it to ``context.out_dir``. The saved epoch is the best one AT the target
    sparsity.

    Only epochs that end after the schedule's last mask update compete for best-on-val: an
    earlier epoch carries fewer zeros, so it would often win on accuracy and then be either
    saved below the target or cut to it afterwards without its accuracy ever measured. After
    the last update the masks no longer change and are re-applied after every step, so every
    competing epoch is already exactly at the target.

    ``sensitivity_dir`` is unused: the signature is shared by every prune family
    (``prune.prune_model``). Returns ``prune_unstructured.saved_facts`` plus ``epochs``,
    ``best_epoch`` and ``resumed_from_epoch``.
    """
    if method not in METHODS:
        raise ShrinkflowError(f"prune.methods: {method!r} is not one of {', '.join(METHODS)}")
    check_sparsity(sparsity)
    dev = resolve_device("auto")
    model, spec = load_model(model_dir, dev)
    p, g = cfg["prune"], cfg["prune"]["gradual"]
    epochs, per_epoch = int(g["epochs"]), steps_per_epoch(cfg, data)
    pruner = GradualPruner(
        model,
        method.removeprefix("gradual_"),
        sparsity,
        epochs * per_epoch,
        g,
        p["scope"],
        p["exclude"],
    )

    def with_sparsity(epoch: int, metrics: dict[str, float]) -> None:
        context.on_epoch(epoch, {**metrics, "sparsity": pruner.sparsity})

    result = fit(
        model,
        cfg,
        data,
        epochs=epochs,
        lr=float(g["lr"]),
        warmup_epochs=0,
        out_dir=Path(context.out_dir),
        resume_dir=Path(context.resume_dir),
        fingerprint=gradual_fingerprint(cfg, method, sparsity, model_dir, data),
        on_epoch=with_sparsity,
        run_id=context.run_id,
        spec=spec,
        step_hook=pruner,
        select_from_epoch=math.ceil(pruner.end / per_epoch),
        device=str(dev),
        lr_key="prune.gradual.lr",
    )
    facts = {
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "resumed_from_epoch": result.resumed_from_epoch,
    }
    return {**saved_facts(cfg, context.out_dir, data, dev), **facts}
