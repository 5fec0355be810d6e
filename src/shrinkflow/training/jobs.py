"""The jobs that train, around the loop, the same on every backend: what `shrinkflow train`
and `shrinkflow finetune` read from the params and hand to a backend's ``train.fit``.

- train: ``train.epochs`` (>= 1) at peak ``train.lr`` after ``train.warmup_epochs``;
- finetune: ``finetune.epochs`` at ``finetune.lr`` without warm-up (the model is already
  trained), everything else as train; with 0 epochs the model files are copied byte for byte
  (a one-shot study) and the result reports the model's val top-1 with ``epochs`` 0.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from shrinkflow.backends.base import JobContext
from shrinkflow.errors import ShrinkflowError
from shrinkflow.training import TrainPlan, TrainResult

Model = TypeVar("Model")


def train_plan(cfg: dict) -> TrainPlan:
    """The baseline's plan from ``cfg["train"]``."""
    t = cfg["train"]
    epochs = int(t["epochs"])
    if epochs < 1:
        raise ShrinkflowError(f"train.epochs: {epochs} is not >= 1")
    return TrainPlan(epochs, float(t["lr"]), int(t["warmup_epochs"]))


def finetune_plan(cfg: dict) -> TrainPlan:
    """Fine-tuning's plan from ``cfg["finetune"]``; ``epochs`` may be 0."""
    f = cfg["finetune"]
    epochs = int(f["epochs"])
    if epochs < 0:
        raise ShrinkflowError(f"finetune.epochs: {epochs} is not >= 0")
    return TrainPlan(epochs, float(f["lr"]), 0, "finetune.lr")


def fit_args(plan: TrainPlan, context: JobContext) -> dict[str, Any]:
    """The keyword arguments of a backend's ``train.fit`` for ``plan`` and the job's outputs
    (see ``loop.train_epochs``); the backend adds the model's ``fingerprint`` and ``spec``."""
    return {**asdict(plan), **context.fit_kwargs()}


def run_finetune(
    cfg: dict,
    model_dir: Path,
    context: JobContext,
    *,
    model_files: Sequence[str],
    fingerprint: Callable[[], str],
    load: Callable[[], tuple[Model, dict[str, Any]]],
    val_top1: Callable[[Model], float],
    fit: Callable[..., TrainResult],
) -> TrainResult:
    """Fine-tune the model in ``model_dir`` with ``cfg["finetune"]`` into ``context.out_dir``.

    The backend supplies ``load()`` (its model and spec, which validates the file before
    anything is written), ``val_top1(model)``, ``fingerprint()`` (of the fine-tuning run) and
    ``fit(model, **args)``: its ``train.fit`` with ``args`` (``fit_args``, fingerprint and
    spec) plus what keeps the model's zeros at zero. ``model_files`` are the files of
    ``model_dir`` that 0 epochs copies.
    """
    started = time.perf_counter()
    plan = finetune_plan(cfg)
    model, spec = load()
    if plan.epochs == 0:
        for name in model_files:
            shutil.copyfile(Path(model_dir) / name, Path(context.out_dir) / name)
        return TrainResult(
            epochs=0,
            best_epoch=0,
            best_val_top1=val_top1(model),
            resumed_from_epoch=0,
            history=[],
            seconds=time.perf_counter() - started,
        )
    return fit(model, fingerprint=fingerprint(), spec=spec, **fit_args(plan, context))
