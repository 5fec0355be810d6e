"""The TensorFlow side of the training loop: ``Trainer``, the ``training.loop.EpochRun`` of a
Keras run (one ``model.fit`` epoch, the validation score, best weights, the resume state), and
``evaluate_split``."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import functools  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow import distributed  # noqa: E402
from shrinkflow.backends.tensorflow.augment import EpochData, to_float  # noqa: E402
from shrinkflow.backends.tensorflow.device import (  # noqa: E402
    POLICIES,
    distribution_strategy,
    fast_path,
    reproducible,
    with_policy,
)
from shrinkflow.backends.tensorflow.distill import Teacher  # noqa: E402
from shrinkflow.backends.tensorflow.optim import LRSchedule, compile_model  # noqa: E402
from shrinkflow.backends.tensorflow.resume_state import (  # noqa: E402
    STATE_FORMAT,
    Checkpoint,
    StateFile,
)
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.progress import track  # noqa: E402
from shrinkflow.training import TrainPlan, diverged, train_batches  # noqa: E402
from shrinkflow.training.resume import matching_state  # noqa: E402


class Trainer:
    """A Keras run ready to train: ``model`` (or its mixed-precision twin) compiled with torch's
    SGD and LR schedule in the process's strategy, its batches and its checkpoint.

    ``train.precision`` picks the twin's policy (``device.POLICIES``; float16 also scales the
    loss) and ``train.compile`` compiles the whole step with XLA (``device.fast_path``).

    ``callbacks`` are Keras callbacks for every ``model.fit`` call (one per epoch); ``prepare``
    is called once with the compiled model before the resume state is restored; ``save``
    writes the model to keep (see ``train.fit``); a distilled run's ``teacher`` adds its logits
    to every batch, and the model is compiled with its loss.
    """

    state_format = STATE_FORMAT

    def __init__(
        self,
        model: keras.Model,
        cfg: dict,
        data: PreparedData,
        plan: TrainPlan,
        resume_dir: Path,
        callbacks: Sequence[keras.callbacks.Callback],
        prepare: Callable[[keras.Model], None] | None,
        save: Callable[[keras.Model], None],
        teacher: Teacher | None = None,
    ) -> None:
        t = cfg["train"]
        self.batch_size = int(t["batch_size"])
        replicas = distributed.replicas()
        self.bounds = train_batches(self.batch_size, len(data.train), replicas)
        reproducible(cfg["seed"])
        path = fast_path(t)
        amp = path.precision == "float16"  # float16 needs loss scaling, bfloat16 does not
        strategy = distribution_strategy()
        steps = len(self.bounds)
        self.teacher = teacher

        def compile_run(trained: keras.Model) -> None:
            compile_model(trained, t, self.schedule, amp)
            if teacher is not None:
                teacher.compile(trained, data.num_classes, float(t["label_smoothing"]))
            if path.compile:  # after every compile, which resets it
                trained.jit_compile = True

        with strategy.scope():
            trained = with_policy(model, POLICIES[path.precision]) if path.mixed else model
            self.schedule = LRSchedule(
                plan.lr, t["schedule"], plan.warmup_epochs * steps, plan.epochs * steps
            )
            compile_run(trained)
            if prepare is not None:
                prepare(trained)
        self.model, self.trained, self.data, self.replicas = model, trained, data, replicas
        self.callbacks, self.save = list(callbacks), save
        self.checkpoint = Checkpoint(trained, strategy, recompile=lambda: compile_run(trained))
        self.file = StateFile(Path(resume_dir))
        self.epoch_data = EpochData(
            data, self.batch_size, bool(t["augment"]), bool(t["hflip"]), cfg["seed"], replicas
        )
        self.diverged = functools.partial(
            diverged, steps=steps, lr_key=plan.lr_key, lr=plan.lr, mixed_precision=amp
        )

    @property
    def val_size(self) -> int:
        return len(self.data.val)

    def resume(self, fingerprint: str) -> dict[str, Any] | None:
        state = matching_state(self.file, fingerprint)
        if state is not None and not self.checkpoint.restore(
            self.file.checkpoint(state["checkpoint"])
        ):
            state = None
            self.file.delete()  # a stale state must not be resumed by a later run either
        return state

    def train_epoch(self, epoch: int, label: str) -> dict[str, float]:
        """``model.fit`` over epoch ``epoch``'s batches, then the val split's score."""
        guard = _StopOnNonFinite()
        steps = len(self.bounds)
        batches = self.epoch_data.batches(epoch)
        if self.teacher is not None:
            batches = self.teacher.with_logits(batches)
        fitted = self.trained.fit(
            batches,
            epochs=epoch,
            initial_epoch=epoch - 1,
            steps_per_epoch=steps if self.replicas > 1 else None,  # a distributed data set's
            verbose=0,
            callbacks=[*self.callbacks, _Progress(steps, label), guard],
        ).history
        if guard.bad is not None:
            raise self.diverged(guard.bad[1], epoch=epoch, step=guard.bad[0])
        val_loss, val_top1 = evaluate_split(self.trained, self.data, "val", self.batch_size)
        return {
            "train_loss": float(fitted["loss"][-1]),
            "train_top1": float(fitted["top1"][-1]),
            "val_loss": val_loss,
            "val_top1": val_top1,
            "lr": float(self.schedule(self.trained.optimizer.iterations - 1)),
        }

    def keep_best(self) -> None:
        self.checkpoint.keep_best()

    def save_state(self, state: dict[str, Any]) -> None:
        self.checkpoint.save(self.file, int(state["epoch"]), state)

    def restore_best(self) -> None:
        """The best epoch's weights (all of them: BN statistics, masks) into the model."""
        self.checkpoint.load_best()

    def check_finite_weights(self, epoch: int) -> None:
        for weight in self.trained.trainable_weights:
            values = weight.numpy()
            if not np.isfinite(values).all():
                bad = float(values[~np.isfinite(values)][0])
                raise self.diverged(bad, epoch=epoch, step=None, what="a weight")

    def save_model(self) -> None:
        if self.trained is not self.model:
            self.model.set_weights(self.trained.get_weights())
        self.save(self.model)


def evaluate_split(
    model: keras.Model, data: PreparedData, split: str, batch_size: int
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 of ``model`` on the "val" or "test" split; NaN if empty.

    The loss is plain cross-entropy whatever train.label_smoothing, so that validation losses
    compare between settings.
    """
    if split not in ("val", "test"):
        raise ShrinkflowError(f"split {split!r} is not val or test")
    index = getattr(data, split)
    if len(index) == 0:
        return math.nan, math.nan
    pixels = tf.data.Dataset.from_tensor_slices(data.images[index]).batch(batch_size)
    logits = model.predict(pixels.map(to_float), verbose=0).astype(np.float64)
    labels = data.labels[index]
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return float(loss), float((logits.argmax(1) == labels).mean())


class _StopOnNonFinite(keras.callbacks.Callback):
    """Stops ``model.fit`` after the first batch whose loss is NaN or infinite and keeps
    ``bad = (step, loss)``, its 1-based step in the epoch; ``train_epoch`` then raises.

    The logged loss is the epoch's running mean, which turns non-finite at exactly that batch and
    stays so. With several workers it is the mean over all of them, so every worker stops at the
    same batch. Reading it costs no extra host sync: ``_Progress`` already has Keras convert
    every batch's logs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bad: tuple[int, float] | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", 0.0))
        if self.bad is None and not math.isfinite(loss):
            self.bad = (batch + 1, loss)
            self.model.stop_training = True


class _Progress(keras.callbacks.Callback):
    """``progress.track`` over an epoch's batches: a bar on a terminal, a few lines otherwise.

    ``track`` reports an item once the loop asks for the next one, so it is advanced at the
    start of every batch and drained when training ends.
    """

    def __init__(self, steps: int, description: str) -> None:
        super().__init__()
        self._steps = iter(track(range(steps), total=steps, description=description))

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        next(self._steps, None)

    def on_train_end(self, logs: dict | None = None) -> None:
        for _ in self._steps:
            pass
