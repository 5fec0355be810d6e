"""`shrinkflow finetune` for TensorFlow: re-train a pruned model while its zeros stay zero.

As on the torch backend, the zero pattern is taken from the model file itself, over EVERY
conv and dense kernel rather than only those ``prune.exclude`` leaves prunable: the stage holds
to "a weight that is zero in the input is zero in the output" whatever produced the input, and
a kernel without zeros has nothing to hold. The pruned model arrives stripped of tfmot's
wrappers (plain Conv2D/Dense), so the masks are re-applied after every training batch by a
callback (``KeepZeros``) rather than by pruning wrappers.

With ``finetune.distill`` set the run is distilled from the baseline in ``teacher_dir``
(``distill``; the stage checks that it is the student's own baseline).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.base import JobContext  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import KERAS_FILE, SPEC_FILE, load_model  # noqa: E402
from shrinkflow.backends.tensorflow.device import distribution_strategy  # noqa: E402
from shrinkflow.backends.tensorflow.distill import load_teacher, teacher_point  # noqa: E402
from shrinkflow.backends.tensorflow.resume_state import job_fingerprint  # noqa: E402
from shrinkflow.backends.tensorflow.train import fit  # noqa: E402
from shrinkflow.backends.tensorflow.trainer import evaluate_split  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.training import TrainResult  # noqa: E402
from shrinkflow.training.distill import distill_plan  # noqa: E402
from shrinkflow.training.jobs import run_finetune  # noqa: E402


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
    """``jobs.run_finetune`` of the model files in ``model_dir`` with ``train.fit``, whose
    ``KeepZeros`` callback re-applies the model's zeros after every batch; distilled from the
    baseline in ``teacher_dir`` when ``finetune.distill`` is set."""
    teacher = load_teacher(distill_plan(cfg, teacher_dir), data)

    def load() -> tuple[keras.Model, dict]:
        with distribution_strategy().scope():
            return load_model(Path(model_dir))

    def val_top1(model: keras.Model) -> float:
        return evaluate_split(model, data, "val", int(cfg["train"]["batch_size"]))[1]

    def fit_zeros_held(model: keras.Model, **args) -> TrainResult:
        keep_zeros = [KeepZeros(zero_masks(model))]
        return fit(model, cfg, data, callbacks=keep_zeros, teacher=teacher, **args)

    return run_finetune(
        cfg,
        model_dir,
        context,
        model_files=[KERAS_FILE, SPEC_FILE],
        fingerprint=lambda: finetune_fingerprint(cfg, model_dir, data, teacher_dir),
        load=load,
        val_top1=val_top1,
        fit=fit_zeros_held,
    )


def prunable_layers(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """The conv and dense layers of ``model`` by name, found inside wrappers too."""
    found = (
        m for m in model.submodules if isinstance(m, (keras.layers.Conv2D, keras.layers.Dense))
    )
    return {layer.name: layer for layer in found}


def zero_masks(model: keras.Model) -> dict[str, np.ndarray]:
    """Per conv/dense layer name, its kernel's keep-mask: 1 where the weight is nonzero."""
    return {
        name: (layer.kernel.numpy() != 0).astype(np.float32)
        for name, layer in prunable_layers(model).items()
    }


class KeepZeros(keras.callbacks.Callback):
    """Multiplies every masked kernel by its mask after each training batch, so the weights
    that were zero stay zero whatever the gradient, momentum or weight decay move.

    Masks are looked up by layer name in ``self.model`` (also a mixed-precision twin of the
    model they were taken from); layers whose mask keeps everything are skipped.
    """

    def __init__(self, masks: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.masks = {name: mask for name, mask in masks.items() if not bool(mask.all())}
        self._apply: Callable[[], None] | None = None
        self._applies_to: keras.Model | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._applies_to is self.model:  # fit trains one epoch per model.fit call
            return
        layers = prunable_layers(self.model)
        missing = sorted(set(self.masks) - set(layers))
        if missing:
            raise ValueError(f"KeepZeros: the model has no conv/dense layer {', '.join(missing)}")
        pairs = [(layers[name].kernel, tf.constant(mask)) for name, mask in self.masks.items()]

        @tf.function
        def apply() -> None:
            for kernel, mask in pairs:
                kernel.assign(kernel * tf.cast(mask, kernel.dtype))

        self._apply, self._applies_to = apply, self.model

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._apply is not None and self.masks:
            self._apply()
