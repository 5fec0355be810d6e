"""What both backends' training loops share, so that they train the same way on the same data.

No framework imports (ruff's TID251 bans them outside the backends): every backend builds on
these definitions, and a change here changes both backends at once.

- this module: a run's plan and result, the recipe constants, the batch split, the model spec
  and the error that stops a diverged run;
- ``loop``: the epoch loop itself (``train_epochs``), which drives a backend's ``EpochRun``;
- ``resume``: the resume state's fingerprint, reading and matching (each backend writes its
  own file format);
- ``jobs``: the train and finetune jobs around the loop (their plans; 0 epochs of fine-tuning
  copies the model).
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


# The recipe constants of both backends, so that they train the same way on the same data.
WARMUP_START = 0.1  # the LR factor at step 0 of the warm-up (lr/10), rising linearly to 1
CROP_PAD_DIVISOR = 8  # crop padding = image_size // 8: CIFAR's 4 pixels at 32x32, scaled


@dataclass
class TrainResult:
    epochs: int
    best_epoch: int
    best_val_top1: float
    resumed_from_epoch: int  # the last epoch restored from the resume state; 0 for a fresh start
    history: list[dict]
    seconds: float  # wall time of this call (a resumed run counts only its own epochs)


@dataclass(frozen=True)
class TrainPlan:
    """How long and how fast a run trains: ``epochs``, the peak LR reached after
    ``warmup_epochs``, and the params key that LR comes from (``lr_key``, named by
    ``diverged``). Its fields are keyword arguments of every backend's ``train.fit``."""

    epochs: int
    lr: float
    warmup_epochs: int = 0
    lr_key: str = "train.lr"


def steps_per_epoch(cfg: dict, data: Any) -> int:
    """Optimizer steps in one epoch over the training split (``data`` is a ``PreparedData``)
    with ``cfg["train"]["batch_size"]``."""
    return len(batch_bounds(len(data.train), int(cfg["train"]["batch_size"])))


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


def train_batches(batch_size: int, n: int, processes: int) -> list[tuple[int, int]]:
    """``global_batches`` of a training split of ``n`` images, after the checks that every
    training loop makes of ``train.batch_size`` and of the split (one-line errors)."""
    if batch_size < 1:
        raise ShrinkflowError(f"train.batch_size: {batch_size} is not >= 1")
    if n == 0:
        raise ShrinkflowError(
            "prepared data has no training images "
            "(lower data.val_fraction / data.test_fraction or add images)"
        )
    if batch_size % processes:
        raise ShrinkflowError(
            f"train.batch_size: {batch_size} does not divide among {processes} processes "
            "(train.distributed.processes)"
        )
    return global_batches(n, batch_size, processes)


def model_spec(model_name: str, data: Any, factory: str | None = None) -> dict[str, Any]:
    """The spec a model file stores beside its weights: what ``model_name`` was built for
    (``data`` is a ``PreparedData``). Every backend's model files carry these keys, and a
    ``custom_models`` model's also its ``factory`` ref (which rebuilds a torch model)."""
    return {
        "arch": model_name,
        "num_classes": data.num_classes,
        "in_channels": data.channels,
        "image_size": data.image_size,
        "mean": [float(m) for m in data.mean],
        "std": [float(s) for s in data.std],
        "classes": [str(c) for c in data.classes],
        **({"factory": factory} if factory else {}),
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
