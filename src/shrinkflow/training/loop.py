"""The epoch loop of every job that trains, on every backend: ``train_epochs``.

The loop owns what does not depend on the framework: the order of the steps of an epoch, the
history rows and the per-epoch callback, best-on-validation selection (ties go to the later
epoch), the resume state's progress fields, the divergence checks' place and the
``TrainResult``. A backend supplies an ``EpochRun``: a run built from its model, optimizer, LR
schedule, data and RNGs, with the primitives the loop calls. The order of those calls is the
backends' contract for reproducibility: on CPU a run repeats bit for bit, and a resumed run
ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from shrinkflow.backends.base import EpochCallback
from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say
from shrinkflow.training import TrainResult


class EpochRun(Protocol):
    """A backend's training run, ready to train: the primitives ``train_epochs`` calls."""

    state_format: str  # the ``format`` of its resume state (``resume.StateFile``)
    val_size: int  # images in the validation split; 0: the last epoch is kept, not the best

    def resume(self, fingerprint: str) -> dict[str, Any] | None:
        """Restore the resume state saved for ``fingerprint`` (weights, optimizer, RNGs, the
        best epoch's weights) and return it; None to start afresh, any other state deleted
        (``resume.matching_state``)."""
        ...

    def train_epoch(self, epoch: int, label: str) -> dict[str, float]:
        """Train epoch ``epoch`` (1-based; ``label`` for its progress bar), then score the
        validation split: train_loss, train_top1, val_loss, val_top1 and lr (of the epoch's
        last step). A non-finite step loss raises ``diverged``."""
        ...

    def diverged(
        self, value: float, *, epoch: int, step: int | None, what: str = "loss"
    ) -> ShrinkflowError:
        """``training.diverged`` for this run's LR key, peak LR, steps and precision."""
        ...

    def keep_best(self) -> None:
        """Keep a copy of the current weights as the best epoch's."""
        ...

    def save_state(self, state: dict[str, Any]) -> None:
        """Write the resume state: ``state`` (the progress fields) and the run's own."""
        ...

    def restore_best(self) -> None:
        """Put the kept best weights back into the model."""
        ...

    def check_finite_weights(self, epoch: int) -> None:
        """Raise ``diverged`` if a weight of the model to keep is NaN or infinite."""
        ...

    def save_model(self) -> None:
        """Write the model (the best epoch's weights) into the job's output folder."""
        ...


def train_epochs(
    build: Callable[[], EpochRun],
    epochs: int,
    fingerprint: str,
    run_id: str | None,
    on_epoch: EpochCallback,
    select_from_epoch: int = 1,
) -> TrainResult:
    """Train the run ``build()`` makes for ``epochs`` and save its best-on-val epoch.

    The arguments every backend's ``train.fit`` passes on:
        fingerprint: hash of everything that decides the result (the backend's
            ``fingerprint_of``); a resume state saved for it is continued, any other one is
            deleted.
        run_id: stored with the resume state, so a resumed job continues the same MLflow run.
        on_epoch: called after every epoch (1-based) with train_loss, train_top1, val_loss,
            val_top1, lr (of the epoch's last step) and epoch_seconds.
        select_from_epoch: only epochs from this one on compete for best-on-val (gradual
            pruning: the epochs at which the target sparsity is reached); clamped to ``epochs``.
    With no validation images the last epoch is kept. The model holds the best epoch's
    weights when this returns, and is saved (``EpochRun.save_model``).
    """
    started = time.perf_counter()
    if epochs < 1:
        raise ValueError(f"fit: epochs {epochs} is not >= 1")
    select_from_epoch = min(select_from_epoch, epochs)
    run = build()
    state = run.resume(fingerprint)
    start_epoch, best_val_top1, best_epoch, history = 0, -1.0, 0, []
    if state is not None:
        start_epoch = int(state["epoch"])
        if start_epoch < epochs:
            say(f"resuming from epoch {start_epoch + 1}/{epochs}")
        else:
            say(f"all {epochs} epochs already trained (resume state); saving the best one")
        best = state["best_val_top1"]  # NaN (null in JSON): no validation images
        best_val_top1 = math.nan if best is None else float(best)
        best_epoch, history = int(state["best_epoch"]), list(state["history"])
    if run.val_size == 0:
        say("no validation images, so the last epoch is kept instead of the best one")

    for epoch in range(start_epoch + 1, epochs + 1):
        label = f"epoch {epoch}/{epochs}"
        metrics = timed_epoch(run, epoch, label)
        history.append({"epoch": epoch, **metrics})
        # Ties go to the later epoch: equally accurate, but trained longer.
        if epoch >= select_from_epoch and (
            run.val_size == 0 or metrics["val_top1"] >= best_val_top1
        ):
            best_val_top1, best_epoch = metrics["val_top1"], epoch
            run.keep_best()
        say_epoch(label, metrics)
        on_epoch(epoch, metrics)
        run.save_state(
            {
                "format": run.state_format,
                "fingerprint": fingerprint,
                "run_id": run_id,
                "epoch": epoch,
                "best_val_top1": best_val_top1,
                "best_epoch": best_epoch,
                "history": history,
            }
        )

    run.restore_best()
    run.check_finite_weights(epochs)
    run.save_model()
    return TrainResult(
        epochs=epochs,
        best_epoch=best_epoch,
        best_val_top1=best_val_top1,
        resumed_from_epoch=start_epoch,
        history=history,
        seconds=time.perf_counter() - started,
    )


def train_in_memory(run: EpochRun, epochs: int) -> None:
    """``train_epochs`` without resume state, best-epoch selection or saving: ``run`` trains
    for ``epochs`` (0: not at all) and keeps its last epoch."""
    for epoch in range(1, epochs + 1):
        label = f"epoch {epoch}/{epochs}"
        say_epoch(label, timed_epoch(run, epoch, label))
    if epochs:
        run.check_finite_weights(epochs)


def timed_epoch(run: EpochRun, epoch: int, label: str) -> dict[str, float]:
    """``run.train_epoch`` with its ``epoch_seconds``; a non-finite validation loss stops the
    run (the last steps' updates broke the weights after their losses were computed)."""
    epoch_start = time.perf_counter()
    metrics = run.train_epoch(epoch, label)
    if run.val_size and not math.isfinite(metrics["val_loss"]):
        raise run.diverged(metrics["val_loss"], epoch=epoch, step=None, what="validation loss")
    return {**metrics, "epoch_seconds": time.perf_counter() - epoch_start}


def say_epoch(label: str, m: dict[str, float]) -> None:
    say(
        f"{label}: train loss {m['train_loss']:.4f} top1 {m['train_top1']:.4f}, "
        f"val loss {m['val_loss']:.4f} top1 {m['val_top1']:.4f}, lr {m['lr']:.5f}, "
        f"{m['epoch_seconds']:.1f} s"
    )
