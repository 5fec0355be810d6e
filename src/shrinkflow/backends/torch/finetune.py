"""`shrinkflow finetune` for PyTorch: re-train a pruned model while its zeros stay zero.

The pruned model's zero pattern is taken from the file itself, over EVERY conv and linear
layer rather than only those ``prune.exclude`` leaves prunable: the stage then holds to "a
weight that is zero in the input is zero in the output" whatever produced the input (one-shot,
gradual or structured pruning, or a preset with other exclusions), and an unpruned layer has no
zeros to hold (a weight that trained to exactly 0.0 stays there, which changes nothing).
Structured pruning removed its filters physically, so a model from it has no masks to keep.

With ``finetune.distill`` set the run is distilled from the baseline in ``teacher_dir``
(``distill``; the stage checks that it is the student's own baseline).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model
from shrinkflow.backends.torch.device import resolve_device
from shrinkflow.backends.torch.distill import load_teacher, teacher_point
from shrinkflow.backends.torch.prune_unstructured import apply_masks, masks_from_zeros
from shrinkflow.backends.torch.resume_state import job_fingerprint
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.backends.torch.train import fit
from shrinkflow.backends.torch.trainer import evaluate_split
from shrinkflow.data.prepared import PreparedData
from shrinkflow.training import TrainResult
from shrinkflow.training.distill import distill_plan
from shrinkflow.training.jobs import run_finetune


def finetune_fingerprint(
    cfg: dict, model_dir: Path, data: PreparedData, teacher_dir: Path | None = None
) -> str:
    """Hash of what decides a fine-tuning run: a resume state is reused only on a match. A
    distilled run's includes its teacher's file."""
    point = teacher_point(distill_plan(cfg, teacher_dir))
    return job_fingerprint("finetune", cfg, point, data, model_dir)


def finetune_model(
    cfg: dict,
    model_dir: Path,
    data: PreparedData,
    context: JobContext,
    teacher_dir: Path | None = None,
) -> TrainResult:
    """``jobs.run_finetune`` of the model file in ``model_dir`` with ``train.fit``, whose step
    hook re-applies the model's zeros after every step; distilled from the baseline in
    ``teacher_dir`` when ``finetune.distill`` is set."""
    dev = resolve_device("auto")
    teacher = load_teacher(distill_plan(cfg, teacher_dir), data)

    def val_top1(model: nn.Module) -> float:
        x, y = to_device_tensors(data, "val", dev)
        return evaluate_split(model, x, y, int(cfg["train"]["batch_size"]), False)[1]

    def fit_zeros_held(model: nn.Module, **args) -> TrainResult:
        # Layers without zeros need no mask: skipping them saves a pass over their weights per
        # step.
        zeros = masks_from_zeros(model, [])
        masks = {name: keep for name, keep in zeros.items() if not bool(keep.all())}

        def keep_zeros(step: int) -> None:
            apply_masks(model, masks)

        hook = keep_zeros if masks else None
        return fit(model, cfg, data, step_hook=hook, device=str(dev), teacher=teacher, **args)

    return run_finetune(
        cfg,
        model_dir,
        context,
        model_files=[MODEL_FILE],
        fingerprint=lambda: finetune_fingerprint(cfg, model_dir, data, teacher_dir),
        load=lambda: load_model(model_dir, dev),
        val_top1=val_top1,
        fit=fit_zeros_held,
    )
