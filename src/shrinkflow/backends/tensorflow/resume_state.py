"""The resume state of a TensorFlow training run, in the job's resume folder.

A ``tf.train.Checkpoint`` (model variables, BN statistics and any tfmot mask, threshold and step
variables included; optimizer step counter and momenta; the best epoch's weights) in its own
folder ``epoch-NNNN/``, plus ``state.json``: the loop's progress fields
(``training.loop.train_epochs``) and the name of its checkpoint, written last, so that a kill
at any moment leaves a state whose checkpoint exists. Batch order and augmentation are pure
functions of ``(seed, epoch)`` (``augment.EpochData``): no RNG state to keep. Matching and
reading: ``training.resume``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import shutil  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, ClassVar  # noqa: E402

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow.artifact import KERAS_FILE  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.outputs import atomic_dir, read_json, write_json  # noqa: E402
from shrinkflow.progress import say  # noqa: E402
from shrinkflow.training import NO_VALIDATION_IMAGES, resume  # noqa: E402

STATE_FILE = "state.json"
# Bumped whenever the resume state's layout or the training procedure changes, so that an old
# state is never resumed by code that would continue it differently.
STATE_FORMAT = "shrinkflow.tensorflow.train-state/1"
CHECKPOINT_PREFIX = "epoch-"  # resume_dir/epoch-0003/ckpt.*: the checkpoint after epoch 3


@dataclass
class StateFile:
    """``state.json`` in ``resume_dir`` and the checkpoint it names."""

    resume_dir: Path
    state_format: ClassVar[str] = STATE_FORMAT

    @property
    def path(self) -> Path:
        return Path(self.resume_dir) / STATE_FILE

    def read(self) -> Any:
        state = read_json(self.path)
        if isinstance(state, dict) and state.get("format") == STATE_FORMAT:
            name = str(state.get("checkpoint"))
            if not (self.checkpoint(name).parent / "ckpt.index").is_file():
                raise ShrinkflowError(f"its checkpoint {name!r} is missing")
        return state

    def checkpoint(self, name: str) -> Path:
        """The prefix of the checkpoint files named ``name``."""
        return Path(self.resume_dir) / name / "ckpt"

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
        _remove_checkpoints(Path(self.resume_dir), keep=None)


def job_fingerprint(
    stage: str, cfg: dict, point: dict[str, Any], data: PreparedData, model_dir: Path | None = None
) -> str:
    """``training.resume.job_fingerprint`` with this backend's state format and model file."""
    model_file = None if model_dir is None else Path(model_dir) / KERAS_FILE
    return resume.job_fingerprint(stage, cfg, point, STATE_FORMAT, data, model_file)


def train_fingerprint(cfg: dict, model_name: str, data: PreparedData) -> str:
    """Hash of all that decides the trained weights: a resume state is reused only on a match."""
    return job_fingerprint("train", cfg, {"model": model_name}, data)


def resumable_run_id(resume_dir: Path, fingerprint: str) -> str | None:
    """The MLflow run id saved with a resume state matching ``fingerprint``, else None."""
    return resume.resumable_run_id(StateFile(Path(resume_dir)), fingerprint)


class Checkpoint:
    """The checkpointed part of a run (model and optimizer variables, the best epoch's weights)
    and its saving/restoring next to ``state.json``."""

    def __init__(
        self, model: keras.Model, strategy: tf.distribute.Strategy, recompile: Callable[[], None]
    ) -> None:
        self.model, self.strategy, self.recompile = model, strategy, recompile
        self.initial = model.get_weights()  # to undo a restore that fails half-way
        # Kept on the host: a copy of the weights needs no accelerator memory.
        with tf.device("/CPU:0"):
            self.best = tf.Module()
            self.best.values = [tf.Variable(w, trainable=False) for w in self.initial]
        self.checkpoint = self._checkpoint()

    def _checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer, best=self.best)

    def keep_best(self) -> None:
        for kept, weight in zip(self.best.values, self.model.get_weights(), strict=True):
            kept.assign(weight)

    def load_best(self) -> None:
        self.model.set_weights([w.numpy() for w in self.best.values])

    def save(self, file: StateFile, epoch: int, state: dict[str, Any]) -> None:
        """Write the checkpoint into its own folder, then ``state.json`` naming it, then drop
        older checkpoints: a kill at any moment leaves a state whose checkpoint exists."""
        name = f"{CHECKPOINT_PREFIX}{epoch:04d}"
        with atomic_dir(file.checkpoint(name).parent) as tmp:
            self.checkpoint.write(str(tmp / "ckpt"))
        write_json(file.path, {**state, "checkpoint": name}, nan_means=NO_VALIDATION_IMAGES)
        _remove_checkpoints(Path(file.resume_dir), keep=name)

    def restore(self, prefix: Path) -> bool:
        """Restore the checkpoint at ``prefix``; False (said why, and back to the state before)
        when it cannot be read."""
        try:
            with self.strategy.scope():
                self.checkpoint.read(str(prefix)).assert_existing_objects_matched()
        except Exception as e:  # TensorFlow raises many kinds for a damaged checkpoint
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            say(f"{prefix}: unreadable resume checkpoint ignored ({reason}); starting over")
            self._undo_restore()
            return False
        return True

    def _undo_restore(self) -> None:
        """Back to the state before a failed restore: initial weights, a fresh optimizer."""
        self.model.set_weights(self.initial)
        for kept, weight in zip(self.best.values, self.initial, strict=True):
            kept.assign(weight)
        with self.strategy.scope():
            self.recompile()
        self.checkpoint = self._checkpoint()


def _remove_checkpoints(resume_dir: Path, keep: str | None) -> None:
    for folder in resume_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if folder.name != keep and folder.is_dir():
            shutil.rmtree(folder)
