"""`shrinkflow finetune` for TensorFlow: re-train a pruned model while its zeros stay zero.

As on the torch backend, the zero pattern is taken from the model file itself, over EVERY
conv and dense kernel rather than only those ``prune.exclude`` leaves prunable: the stage holds
to "a weight that is zero in the input is zero in the output" whatever produced the input, and
a kernel without zeros has nothing to hold. The pruned model arrives stripped of tfmot's
wrappers (plain Conv2D/Dense), so the masks are re-applied after every training batch by a
callback (``KeepZeros``) rather than by pruning wrappers.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow.artifact import KERAS_FILE, SPEC_FILE, load_model  # noqa: E402
from shrinkflow.backends.tensorflow.train import (  # noqa: E402
    TrainResult,
    distribution_strategy,
    evaluate_split,
    fingerprint_of,
    fit,
)
from shrinkflow.data.prepared import PreparedData, sha256_file  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402


def finetune_fingerprint(cfg: dict, model_dir: Path, data: PreparedData) -> str:
    """Hash of what decides a fine-tuning run: a resume state is reused only on a match."""
    return fingerprint_of(
        {
            "stage": "finetune",
            "finetune": cfg["finetune"],
            "train": cfg["train"],
            "seed": cfg["seed"],
            "data": data.fingerprint,
            "model": sha256_file(Path(model_dir) / KERAS_FILE),
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
    ``finetune.epochs`` 0 the model files are copied byte for byte (a one-shot study) and the
    result reports its val top-1 with ``epochs`` 0.
    """
    started = time.perf_counter()
    f = cfg["finetune"]
    epochs = int(f["epochs"])
    if epochs < 0:
        raise ShrinkflowError(f"finetune.epochs: {epochs} is not >= 0")
    with distribution_strategy().scope():
        model, spec = load_model(Path(model_dir))  # validates the file before anything is written
    if epochs == 0:
        for name in (KERAS_FILE, SPEC_FILE):
            shutil.copyfile(Path(model_dir) / name, Path(out_dir) / name)
        _, val_top1 = evaluate_split(model, data, "val", int(cfg["train"]["batch_size"]))
        return TrainResult(
            epochs=0,
            best_epoch=0,
            best_val_top1=val_top1,
            resumed_from_epoch=0,
            history=[],
            seconds=time.perf_counter() - started,
        )
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
        callbacks=[KeepZeros(zero_masks(model))],
        lr_key="finetune.lr",
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
