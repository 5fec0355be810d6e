"""Train a tf-keras model on prepared data: the TensorFlow twin of ``backends/torch/train.py``.

One loop (``fit``) serves every stage that trains: the baseline (``train_model``), fine-tuning
and gradual pruning, which hook into it with Keras callbacks (tfmot's ``UpdatePruningStep``,
``finetune.KeepZeros``). The loop itself is ``training.loop.train_epochs``, the same for both
backends; it drives a ``trainer.Trainer``, which runs ``model.fit`` one epoch at a time and
copies torch's recipe: SGD in torch's form (coupled weight decay on conv/dense kernels only,
momentum buffer, Nesterov) and linear warm-up from lr/10 then cosine to 0 per step
(``optim``), random crop of the zero-padded image and optional horizontal flip (``augment``),
label smoothing, the same batch split and best-on-val selection.

Reproducibility: the weight init comes from ``cfg["seed"]``; an epoch's batch order and
augmentation are drawn from a NumPy generator seeded with ``(seed, epoch)``, a pure function of
the two, so nothing but weights and optimizer state has to survive a resume. On CPU (with op
determinism on and a fixed thread count) two runs end with bit-identical weights, and a killed
run resumed from its last saved epoch ends bit-identical to an uninterrupted one. The resume
state: ``resume_state``.

Distribution: with more than one GPU visible every model and optimizer lives in one
``MirroredStrategy`` (see ``device.distribution_strategy``); ``cfg["train"]["batch_size"]`` is
the global batch, split over the replicas. In the worker started by ``distributed.launch``
(``train.distributed.processes`` = N > 1) it is a ``MirroredStrategy`` over N devices (N GPUs,
or N logical CPUs), and each replica takes an interleaved share of each global batch, with
sample weights that make the summed gradient that of the whole batch's mean loss. BatchNorm
statistics are per replica while training and averaged over the replicas when read. (Why one
process rather than one per replica: see ``distributed``.)
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import tf_keras as keras  # noqa: E402

from shrinkflow.backends.base import EpochCallback, JobContext  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import save_model  # noqa: E402
from shrinkflow.backends.tensorflow.device import distribution_strategy, reproducible  # noqa: E402
from shrinkflow.backends.tensorflow.distill import Teacher  # noqa: E402
from shrinkflow.backends.tensorflow.models import create_model  # noqa: E402
from shrinkflow.backends.tensorflow.resume_state import (  # noqa: E402
    train_fingerprint,
)
from shrinkflow.backends.tensorflow.trainer import Trainer  # noqa: E402
from shrinkflow.custom_models import factory_ref  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.training import (  # noqa: E402
    TrainPlan,
    TrainResult,
    model_spec,
)
from shrinkflow.training.jobs import fit_args, train_plan  # noqa: E402
from shrinkflow.training.loop import train_epochs  # noqa: E402


def train_model(
    cfg: dict,
    model_name: str,
    data: PreparedData,
    context: JobContext,
) -> TrainResult:
    """Train a fresh ``model_name`` with ``cfg["train"]`` and save its best-on-val epoch.

    The arguments are those of ``fit``; the model is initialised from ``cfg["seed"]``.
    """
    args = fit_args(train_plan(cfg), context)
    reproducible(cfg["seed"])
    factory = factory_ref(cfg, "tensorflow", model_name)  # None for a registry model
    with distribution_strategy().scope():
        model = create_model(
            model_name,
            data.num_classes,
            data.channels,
            data.image_size,
            data.mean,
            data.std,
            factory=factory,
        )
    fingerprint = train_fingerprint(cfg, model_name, data)
    spec = model_spec(model_name, data, factory)
    return fit(model, cfg, data, fingerprint=fingerprint, spec=spec, **args)


def fit(
    model: keras.Model,
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
    callbacks: Sequence[keras.callbacks.Callback] = (),
    select_from_epoch: int = 1,
    save: Callable[[keras.Model, Path], None] | None = None,
    prepare: Callable[[keras.Model], None] | None = None,
    lr_key: str = "train.lr",
    teacher: Teacher | None = None,
) -> TrainResult:
    """Train ``model`` for ``epochs`` and save its best-on-val epoch to ``out_dir``: the loop
    ``training.loop.train_epochs`` (which says what ``fingerprint``, ``on_epoch``, ``run_id``
    and ``select_from_epoch`` do) over a ``trainer.Trainer``.

    ``model`` takes raw 0..255 float32 pixels and returns logits, and must have been created
    in ``distribution_strategy().scope()``. Batch size, momentum, Nesterov, weight decay,
    augmentation, label smoothing, the LR schedule's shape and mixed precision come from
    ``cfg["train"]``; ``lr`` is the peak LR reached after ``warmup_epochs``; ``lr_key`` the
    params key it comes from, named by the error that stops a run whose loss becomes NaN or
    infinite (``training.diverged``).

    Args:
        out_dir: an existing empty folder (the caller renames it into place) that receives
            the model, written by ``artifact.save_model(model, spec, out_dir)``; the test
            split is never read here.
        resume_dir: where the per-epoch resume state (``resume_state``) lives.
        callbacks: Keras callbacks for every ``model.fit`` call (one per epoch). They must act
            on ``self.model``: with mixed precision that is a float16 twin of ``model``.
        save: writes the best model into ``out_dir`` instead of ``artifact.save_model`` (for
            a model that needs another format, such as a tfmot-wrapped one to strip first).
        prepare: called once with the model to train, compiled, inside the strategy scope and
            before the resume state is restored: the place to create variables that the
            checkpoint must hold.
        teacher: distils from this teacher (``distill``): the loss becomes the distillation
            loss of every batch.

    ``model`` holds the best epoch's weights (all of them: BN statistics, masks) when this
    returns.
    """
    plan = TrainPlan(epochs, lr, warmup_epochs, lr_key)

    def keep(best: keras.Model) -> None:
        if save is None:
            save_model(best, spec, Path(out_dir))
        else:
            save(best, Path(out_dir))

    def build() -> Trainer:
        return Trainer(model, cfg, data, plan, Path(resume_dir), callbacks, prepare, keep, teacher)

    return train_epochs(build, epochs, fingerprint, run_id, on_epoch, select_from_epoch)
