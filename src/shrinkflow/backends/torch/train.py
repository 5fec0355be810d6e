"""Train a model on prepared data: SGD, warm-up + cosine LR, in-memory augmentation, resumable.

One loop (``fit``) serves every stage that trains: the baseline (``train_model``), fine-tuning
a pruned model and gradual pruning, which hook into it through ``step_hook``. The loop itself
is ``training.loop.train_epochs``, the same for both backends; it drives a ``trainer.Trainer``
(the epoch's steps, validation, best weights, resume state) built from ``optim`` (SGD and the
LR schedule), ``augment`` (batch order, crops and flips), ``resume_state`` (``state.pt``) and
``device``.

Reproducibility: the weight init, the batch order and the augmentation all come from
``cfg["seed"]`` (the global RNG for init and dropout, one CPU ``torch.Generator`` for batches and
crops), so on CPU two runs with the same params, data and thread count end with bit-identical
weights. A killed run resumes from the state saved after its last completed epoch and still ends
bit-identical to an uninterrupted run, because every source of state (weights, BN statistics,
optimizer momentum, scheduler position, GradScaler, RNGs, a stateful step hook) is saved and
restored.

Data parallelism: in a torchrun worker (``train.distributed.processes`` > 1; see
``distributed.py``) ``train_model`` trains in DistributedDataParallel. Every process draws the
same batch order and augmentation from the seed and takes an interleaved share of each global
batch of ``batch_size`` images (as ``DistributedSampler`` does with a data set), with its loss
weighted by its share, so the averaged gradient is that of the whole batch. BatchNorm statistics
are per process (SyncBatchNorm needs GPUs in torch 2.14: CPU inputs raise). Only rank 0 writes
the resume state and the model; every process resumes from rank 0's state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrinkflow.backends.base import EpochCallback, JobContext
from shrinkflow.backends.torch import distributed
from shrinkflow.backends.torch.artifact import save_model
from shrinkflow.backends.torch.device import deterministic_on_cpu, resolve_device
from shrinkflow.backends.torch.distill import Teacher
from shrinkflow.backends.torch.models import create_model
from shrinkflow.backends.torch.resume_state import (
    train_fingerprint,
)
from shrinkflow.backends.torch.trainer import (
    StepHook,
    Trainer,
)
from shrinkflow.custom_models import factory_ref
from shrinkflow.data.prepared import PreparedData
from shrinkflow.training import TrainPlan, TrainResult, model_spec
from shrinkflow.training.jobs import fit_args, train_plan
from shrinkflow.training.loop import train_epochs, train_in_memory


def train_model(
    cfg: dict,
    model_name: str,
    data: PreparedData,
    context: JobContext,
    device: str = "auto",
) -> TrainResult:
    """Train a fresh ``model_name`` with ``cfg["train"]`` and save its best-on-val epoch.

    The arguments are those of ``fit``; the model is initialised from ``cfg["seed"]``. In a
    torchrun worker it trains data-parallel on the worker's device (``device`` is ignored).
    """
    args = fit_args(train_plan(cfg), context)
    torch.manual_seed(cfg["seed"])
    factory = factory_ref(cfg, "torch", model_name)  # None for a registry model
    model = create_model(
        model_name, data.num_classes, data.channels, data.image_size, factory=factory
    )
    with distributed.process_group():
        if distributed.worker_rank() is not None:
            device = distributed.device_of_worker()
        fingerprint = train_fingerprint(cfg, model_name, data)
        spec = model_spec(model_name, data, factory)
        return fit(model, cfg, data, fingerprint=fingerprint, spec=spec, device=device, **args)


def fit(
    model: nn.Module,
    cfg: dict,
    data: PreparedData,
    *,
    epochs: int,
    lr: float,
    warmup_epochs: int,
    out_dir: Path,
    resume_dir: Path,
    fingerprint: str,
    on_epoch: EpochCallback,
    run_id: str | None,
    spec: dict[str, Any],
    step_hook: StepHook | None = None,
    select_from_epoch: int = 1,
    device: str = "auto",
    save: Callable[[nn.Module, Path], None] | None = None,
    lr_key: str = "train.lr",
    teacher: Teacher | None = None,
) -> TrainResult:
    """Train ``model`` for ``epochs`` and save its best-on-val epoch to ``out_dir``: the loop
    ``training.loop.train_epochs`` (which says what ``fingerprint``, ``on_epoch``, ``run_id``
    and ``select_from_epoch`` do) over a ``trainer.Trainer``.

    Batch size, momentum, Nesterov, weight decay, augmentation, label smoothing, the LR
    schedule's shape and mixed precision come from ``cfg["train"]``; ``lr`` is the peak LR
    reached after ``warmup_epochs``; ``lr_key`` the params key it comes from, named by the
    error that stops a run whose loss becomes NaN or infinite (``training.diverged``).

    Args:
        out_dir: an existing empty folder (the caller renames it into place) that receives
            the model file, written by ``artifact.save_model(model, spec, out_dir)``; the test
            split is never read here.
        resume_dir: where the per-epoch resume state (``resume_state``) lives.
        step_hook: called with the global step (1-based over the whole run, also across a
            resume) after every optimizer step; a ``StatefulStepHook``'s state is resumed too.
        device: "auto" (CUDA if available, else CPU), "cpu" or "cuda[:n]".
        save: writes the best model into ``out_dir`` instead of ``artifact.save_model`` (a
            model that is not a registry model, such as a QAT graph, has its own format);
            ``model`` holds the best epoch's weights when it returns.
        teacher: distils from this teacher (``distill``): the loss becomes the distillation
            loss of every batch.

    In a process group (DDP) only rank 0 writes the resume state and the model; the others
    read rank 0's resume state and write nothing.
    """
    dev = resolve_device(device)
    plan = TrainPlan(epochs, lr, warmup_epochs, lr_key)

    def keep(best: nn.Module) -> None:
        if save is None:
            save_model(best, spec, Path(out_dir))
        else:
            save(best, Path(out_dir))

    def build() -> Trainer:
        return Trainer.build(
            model, cfg, data, plan, dev, step_hook, Path(resume_dir), keep, teacher
        )

    with deterministic_on_cpu(dev):
        return train_epochs(build, epochs, fingerprint, run_id, on_epoch, select_from_epoch)


def fit_in_memory(
    model: nn.Module,
    cfg: dict,
    data: PreparedData,
    *,
    epochs: int,
    lr: float,
    step_hook: StepHook | None = None,
    device: str = "auto",
    lr_key: str = "finetune.lr",
) -> nn.Module:
    """``fit`` without warm-up, resume state, saving or best-epoch selection: ``model`` trains
    in place for ``epochs`` (0: unchanged) and is returned in eval mode on the device, its last
    epoch kept. Meant for the short recoveries between rounds of iterative pruning."""
    dev = resolve_device(device)
    plan = TrainPlan(max(epochs, 1), lr, 0, lr_key)
    with deterministic_on_cpu(dev):
        train_in_memory(Trainer.build(model, cfg, data, plan, dev, step_hook), epochs)
    return model.eval()
