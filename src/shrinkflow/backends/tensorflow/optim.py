"""The optimizer and LR schedule of a TensorFlow run, in torch's form (``backends/torch/optim.py``)
so that both backends optimise alike: SGD with torch's momentum buffer and coupled weight decay
on conv/dense kernels only, and a linear warm-up from lr/10 followed by a cosine to 0 (or a flat
LR), per step."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import math  # noqa: E402
from typing import Any  # noqa: E402

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.training import WARMUP_START  # noqa: E402


class LRSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Peak ``lr`` times torch's ``optim.lr_factor``: linear from lr/10 to lr over the warm-up,
    then cosine to 0 at ``total_steps`` (just after the last step) or flat.

    Evaluated at the optimizer's step counter, which the resume state holds, so a resumed run
    continues the schedule where it stopped. Computed in float64, as torch does in Python.
    """

    def __init__(self, lr: float, schedule: str, warmup_steps: int, total_steps: int) -> None:
        if schedule not in ("cosine", "constant"):
            raise ShrinkflowError(f"train.schedule: {schedule!r} is not cosine or constant")
        self.lr, self.schedule = float(lr), schedule
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)

    def __call__(self, step: Any) -> tf.Tensor:
        step = tf.cast(step, tf.float64)
        warmup = tf.constant(float(self.warmup_steps), tf.float64)
        rising = WARMUP_START + (1.0 - WARMUP_START) * step / tf.maximum(warmup, 1.0)
        if self.schedule == "constant":
            after = tf.constant(1.0, tf.float64)
        else:
            progress = (step - warmup) / max(1, self.total_steps - self.warmup_steps)
            after = 0.5 * (1.0 + tf.cos(math.pi * tf.minimum(progress, 1.0)))
        factor = tf.where(step < warmup, rising, after)
        return tf.cast(self.lr * factor, tf.float32)

    def get_config(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }


class TorchSGD(keras.optimizers.SGD):
    """SGD with the update rule of ``torch.optim.SGD``, so both backends optimise alike.

    torch keeps ``buf = momentum * buf + g`` and steps ``w -= lr * buf`` (Nesterov:
    ``w -= lr * (g + momentum * buf)``); Keras' SGD folds the LR into the velocity, which
    differs as soon as the LR changes from step to step. Weight decay is torch's coupled L2:
    ``weight_decay * w`` joins the gradient before the momentum, which is the gradient of
    ``weight_decay / 2 * |w|^2`` in the loss, not Keras' decoupled ``weight_decay`` (a shrink
    by ``lr * weight_decay * w`` outside the momentum). It applies to conv and dense kernels
    only, the variables with two or more dimensions, as torch's ``optim.param_groups`` does:
    not to BN scales and shifts nor biases.
    """

    def __init__(self, *args: Any, coupled_weight_decay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.coupled_weight_decay = float(coupled_weight_decay)

    def update_step(self, gradient: Any, variable: tf.Variable) -> None:
        gradient = tf.convert_to_tensor(gradient)
        lr = tf.cast(self.learning_rate, variable.dtype)
        if self.coupled_weight_decay and len(variable.shape) > 1:
            gradient += tf.cast(self.coupled_weight_decay, variable.dtype) * variable
        momentum = tf.cast(self.momentum, variable.dtype)
        buf = self.momentums[self._index_dict[self._var_key(variable)]]
        buf.assign(momentum * buf + gradient)
        variable.assign_sub(lr * (gradient + momentum * buf if self.nesterov else buf))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "coupled_weight_decay": self.coupled_weight_decay}


def compile_model(model: keras.Model, t: dict, schedule: LRSchedule, amp: bool) -> None:
    """Compile ``model`` with a fresh optimizer whose variables exist (restorable) at once;
    ``amp``: the model computes in float16, so the loss is scaled (bfloat16 needs no scaling)."""
    optimizer: keras.optimizers.Optimizer = TorchSGD(
        learning_rate=schedule,
        momentum=float(t["momentum"]),
        nesterov=bool(t["nesterov"]),
        coupled_weight_decay=float(t["weight_decay"]),
        # XLA-fused updates pay on a GPU; on a CPU compiling them costs more than they save.
        jit_compile=bool(tf.config.list_physical_devices("GPU")),
    )
    if amp:
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    # One-hot labels: Keras' label smoothing needs them (the sparse loss has none). Keras
    # smooths as torch does: (1 - s) * one_hot + s / num_classes.
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=float(t["label_smoothing"])
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="top1")],
    )
    optimizer.build(model.trainable_variables)
