"""`shrinkflow finetune` for PyTorch: re-train a pruned model while its zeros stay zero.

The pruned model's zero pattern is taken from the file itself, over EVERY conv and linear
layer rather than only those ``prune.exclude`` leaves prunable: the stage then holds to "a
weight that is zero in the input is zero in the output" whatever produced the input (one-shot,
gradual or structured pruning, or a preset with other exclusions), and an unpruned layer has no
zeros to hold (a weight that trained to exactly 0.0 stays there, which changes nothing).
Structured pruning removed its filters physically, so a model from it has no masks to keep.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model
from shrinkflow.backends.torch.prune_unstructured import apply_masks, masks_from_zeros
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.backends.torch.train import (
    TrainResult,
    evaluate_split,
    fingerprint_of,
    fit,
    resolve_device,
)
from shrinkflow.data.prepared import PreparedData, sha256_file
from shrinkflow.errors import ShrinkflowError


def finetune_fingerprint(cfg: dict, model_dir: Path, data: PreparedData) -> str:
    """Hash of what decides a fine-tuning run: a resume state is reused only on a match."""
    return fingerprint_of(
        {
            "stage": "finetune",
            "finetune": cfg["finetune"],
            "train": cfg["train"],
            "seed": cfg["seed"],
            "data": data.fingerprint,
            "model": sha256_file(Path(model_dir) / MODEL_FILE),
        }
    )


def finetune_model(
    cfg: dict,
    model_dir: Path,
    data: PreparedData,
    out_dir: Path,
    resume_dir: Path,
    on_epoch: Callable[[int, dict[str, float]], None],
    run_id: str | None,
) -> TrainResult:
    """Fine-tune the model in ``model_dir`` with ``cfg["finetune"]`` and save it to ``out_dir``.

    Epochs, peak LR and fingerprint are the fine-tuning ones, without warm-up (the model is
    already trained); everything else is ``train.fit`` with ``cfg["train"]``. With
    ``finetune.epochs`` 0 the model file is copied byte for byte (a one-shot study) and the
    result reports its val top-1 with ``epochs`` 0.
    """
    started = time.perf_counter()
    f = cfg["finetune"]
    epochs = int(f["epochs"])
    if epochs < 0:
        raise ShrinkflowError(f"finetune.epochs: {epochs} is not >= 0")
    dev = resolve_device("auto")
    model, spec = load_model(model_dir, dev)  # validates the file before anything is written
    if epochs == 0:
        shutil.copyfile(Path(model_dir) / MODEL_FILE, Path(out_dir) / MODEL_FILE)
        x, y = to_device_tensors(data, "val", dev)
        _, val_top1 = evaluate_split(model, x, y, int(cfg["train"]["batch_size"]), False)
        return TrainResult(
            epochs=0,
            best_epoch=0,
            best_val_top1=val_top1,
            resumed_from_epoch=0,
            history=[],
            seconds=time.perf_counter() - started,
        )
    # Layers without zeros need no mask: skipping them saves a pass over their weights per step.
    masks = {n: keep for n, keep in masks_from_zeros(model, []).items() if not bool(keep.all())}

    def keep_zeros(step: int) -> None:
        apply_masks(model, masks)

    return fit(
        model,
        cfg,
        data,
        epochs=epochs,
        lr=float(f["lr"]),
        warmup_epochs=0,
        out_dir=Path(out_dir),
        resume_dir=Path(resume_dir),
        fingerprint=finetune_fingerprint(cfg, model_dir, data),
        on_epoch=on_epoch,
        run_id=run_id,
        spec=spec,
        step_hook=keep_zeros if masks else None,
        device=str(dev),
        lr_key="finetune.lr",
    )
