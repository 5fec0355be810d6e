"""Knowledge distillation for Keras runs: the loss (``distill_loss``) and the teacher whose
logits join each training batch (``Teacher``). What the loss is and why: see
``shrinkflow.training.distill``.

Keras hands a loss only ``(y_true, y_pred)``, so the teacher's logits travel in ``y_true``: the
epoch's batches ``(x, one_hot)`` become ``(x, [one_hot | teacher(x)])``, computed in the input
pipeline on the very batch (crops and flips included) the student then trains on. The run is
compiled with ``DistillLoss`` and a top-1 metric that read the two halves apart.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from pathlib import Path  # noqa: E402

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow.artifact import KERAS_FILE, load_model  # noqa: E402
from shrinkflow.backends.tensorflow.device import distribution_strategy  # noqa: E402
from shrinkflow.data.prepared import PreparedData, check_fits, sha256_file  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.training.distill import Distill  # noqa: E402


def distill_loss(
    student_logits: tf.Tensor,
    teacher_logits: tf.Tensor,
    hard_loss: tf.Tensor,
    alpha: float,
    temperature: float,
) -> tf.Tensor:
    """Per image, ``(1 - alpha) * hard_loss + alpha * T^2 * KL(softmax(teacher/T) ||
    softmax(student/T))``, the KL divergence summed over classes."""
    t = float(temperature)
    log_student = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / t, axis=1)
    log_teacher = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / t, axis=1)
    soft = tf.reduce_sum(tf.exp(log_teacher) * (log_teacher - log_student), axis=1)
    return (1.0 - alpha) * hard_loss + alpha * t * t * soft


class DistillLoss(keras.losses.Loss):
    """``distill_loss`` of ``y_true = [one_hot | teacher logits]``; the hard term is the
    run's categorical cross-entropy with ``label_smoothing``, as an undistilled run's."""

    def __init__(
        self, num_classes: int, alpha: float, temperature: float, label_smoothing: float
    ) -> None:
        super().__init__(name="distill_loss")
        self.num_classes, self.alpha, self.temperature = num_classes, alpha, temperature
        self.label_smoothing = label_smoothing

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        labels, teacher_logits = y_true[:, : self.num_classes], y_true[:, self.num_classes :]
        logits = tf.cast(y_pred, tf.float32)
        hard = keras.losses.categorical_crossentropy(
            labels, logits, from_logits=True, label_smoothing=self.label_smoothing
        )
        return distill_loss(logits, teacher_logits, hard, self.alpha, self.temperature)


class Teacher:
    """The float teacher of a distilled run: adds its logits to every training batch
    (``with_logits``) and compiles the student to read them (``compile``)."""

    def __init__(self, model: keras.Model, alpha: float, temperature: float) -> None:
        self.model, self.alpha, self.temperature = model, float(alpha), float(temperature)
        self.model.trainable = False

    def with_logits(self, batches: tf.data.Dataset) -> tf.data.Dataset:
        """``(x, one_hot)`` batches as ``(x, [one_hot | teacher logits of x])``."""
        if not isinstance(batches, tf.data.Dataset):
            raise ShrinkflowError(
                "finetune.distill: a TensorFlow run distils on one device only (one replica); "
                "set train.distributed.processes to 1 or make one GPU visible"
            )
        model = self.model

        def add_logits(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            logits = tf.cast(model(x, training=False), tf.float32)
            return x, tf.concat([y, logits], axis=1)

        return batches.map(add_logits).prefetch(tf.data.AUTOTUNE)

    def compile(self, model: keras.Model, num_classes: int, label_smoothing: float) -> None:
        """Recompile ``model`` (already compiled by ``optim.compile_model``, whose optimizer it
        keeps) with ``DistillLoss`` and a top-1 metric of the labels' half of ``y_true``."""

        def top1(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
            return keras.metrics.categorical_accuracy(y_true[:, :num_classes], y_pred)

        model.compile(
            optimizer=model.optimizer,
            loss=DistillLoss(num_classes, self.alpha, self.temperature, label_smoothing),
            metrics=[keras.metrics.MeanMetricWrapper(top1, name="top1")],
        )


def load_teacher(plan: Distill | None, data: PreparedData) -> Teacher | None:
    """The teacher of ``plan`` (None: no distillation), checked to fit ``data``."""
    if plan is None:
        return None
    with distribution_strategy().scope():
        model, spec = load_model(plan.teacher_dir)
    check_fits(spec, data, plan.teacher_dir / KERAS_FILE)
    return Teacher(model, plan.alpha, plan.temperature)


def teacher_point(plan: Distill | None) -> dict[str, str]:
    """What a distilled run adds to its resume fingerprint's point: the teacher file's hash
    (its params are among the stage's params already). Nothing when it is not distilled, so
    that the fingerprint of a plain run is unchanged."""
    return {} if plan is None else {"teacher": sha256_file(Path(plan.teacher_dir) / KERAS_FILE)}
