"""What both backends' training loops share, so that they train the same way on the same data.

No framework imports: ``backends/torch/train.py`` and ``backends/tensorflow/train.py`` both build
on these definitions, and a change here changes both backends at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shrinkflow.errors import ShrinkflowError

# What a null stands for in the JSON a stage writes (train.json, prune.json, quantize.json,
# metrics.json): a score of the validation split, which is empty when data.val_fraction leaves
# no image in it. The only NaN a stage may write (as null, ``outputs.write_json(nan_means=...)``);
# a NaN loss stops training first (``diverged``).
NO_VALIDATION_IMAGES = (
    "no validation images (data.val_fraction leaves none): val_loss, val_top1 and "
    "best_val_top1 are undefined"
)


@dataclass
class TrainResult:
    epochs: int
    best_epoch: int
    best_val_top1: float
    resumed_from_epoch: int  # the last epoch restored from the resume state; 0 for a fresh start
    history: list[dict]
    seconds: float  # wall time of this call (a resumed run counts only its own epochs)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch over n samples. The last partial batch is kept, except that a
    final batch of ONE sample joins the batch before it: BatchNorm cannot train on one sample
    whose feature maps are 1x1 (VGG and the big ResNets at small image sizes)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(s, min(s + batch_size, n)) for s in starts[:-1]] + [(starts[-1], n)] if starts else []


def global_batches(n: int, batch_size: int, processes: int) -> list[tuple[int, int]]:
    """``batch_bounds`` of the global batches when ``processes`` share each one (data-parallel
    training), except that a last batch too small to give every process two samples joins the
    batch before it: BatchNorm trains on each process's share. For one process, exactly
    ``batch_bounds``."""
    bounds = batch_bounds(n, batch_size)
    if processes > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2 * processes:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def model_spec(model_name: str, data: Any) -> dict[str, Any]:
    """The spec a model file stores beside its weights: what ``model_name`` was built for
    (``data`` is a ``PreparedData``). Every backend's model files carry these keys."""
    return {
        "arch": model_name,
        "num_classes": data.num_classes,
        "in_channels": data.channels,
        "image_size": data.image_size,
        "mean": [float(m) for m in data.mean],
        "std": [float(s) for s in data.std],
        "classes": [str(c) for c in data.classes],
    }


def diverged(
    value: float,
    *,
    epoch: int,
    step: int | None,
    steps: int,
    lr_key: str,
    lr: float,
    mixed_precision: bool,
    what: str = "loss",
) -> ShrinkflowError:
    """The one-line error that stops a job whose training diverged (both backends, every loop).

    ``value`` is the first non-finite loss; ``step`` its optimizer step within ``epoch``
    (1-based, of ``steps``), None when this process did not see it (another data-parallel process
    did, or only the validation loss shows it); ``lr_key`` the params key of the peak LR the loop
    ran with (``train.lr``, ``finetune.lr``, ``prune.gradual.lr``, ``quantize.qat.lr``). Raising
    it inside the job's MLflow run ends the run FAILED, and the atomic output is never written.
    """
    where = f"epoch {epoch} step {step} of {steps}" if step is not None else f"epoch {epoch}"
    tries = [f"lower {lr_key} (now {lr:g})"]
    if lr_key == "train.lr":
        tries.append("raise train.warmup_epochs")
    if mixed_precision:
        tries.append("set train.mixed_precision: false (float16 overflows)")
    tries.append("check the data")
    return ShrinkflowError(
        f"{lr_key.split('.')[0]}: {what} became {value} at {where}; "
        f"{', '.join(tries[:-1])} or {tries[-1]}"
    )
