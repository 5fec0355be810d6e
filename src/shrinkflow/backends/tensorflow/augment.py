"""A TensorFlow run's batches: each epoch's order and augmentation (random crop of the
black-padded image, optional horizontal flip), drawn from ``(seed, epoch)`` alone."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from shrinkflow.backends.tensorflow.device import distribution_strategy  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.training import CROP_PAD_DIVISOR, global_batches  # noqa: E402


class EpochData:
    """The training split as one tensor, and each epoch's batches: order, crops and flips drawn
    from ``(seed, epoch)`` alone, so epoch e is the same batches in every run and resume.

    ``replicas`` > 1: each global batch as that many interleaved shares, one per replica of
    ``distribution_strategy()``, each weighted by its share (see ``train``'s docstring).
    """

    def __init__(
        self,
        data: PreparedData,
        batch_size: int,
        augment: bool,
        hflip: bool,
        seed: int,
        replicas: int = 1,
    ) -> None:
        with tf.device("/CPU:0"):  # the input pipeline runs on the host
            self.images = tf.constant(data.images[data.train])
            self.labels = tf.constant(data.labels[data.train])
        self.num_classes = data.num_classes
        self.replicas = replicas
        self.bounds = global_batches(len(data.train), batch_size, replicas)
        self.pad = data.image_size // CROP_PAD_DIVISOR if augment else 0
        self.hflip = augment and hflip
        self.seed = int(seed)

    def batches(self, epoch: int) -> tf.data.Dataset | tf.distribute.DistributedDataset:
        n = len(self.labels)
        rng = np.random.default_rng([self.seed, epoch])
        order = tf.constant(rng.permutation(n))
        shifts = tf.constant(rng.integers(0, 2 * self.pad + 1, (n, 2)))
        flips = tf.constant(rng.random(n) < 0.5)
        starts = tf.constant([s for s, _ in self.bounds], tf.int64)
        stops = tf.constant([s for _, s in self.bounds], tf.int64)

        def batch(i: tf.Tensor, replica: tf.Tensor | int = 0) -> tuple[tf.Tensor, ...]:
            idx = order[starts[i] : stops[i]]
            if self.replicas > 1:
                idx = idx[replica :: self.replicas]
            x = augment_batch(
                tf.gather(self.images, idx),
                tf.gather(shifts, idx),
                tf.gather(flips, idx) if self.hflip else None,
                self.pad,
            )
            y = tf.one_hot(tf.gather(self.labels, idx), self.num_classes)
            if self.replicas == 1:
                return to_float(x), y
            # Keras divides each replica's loss sum by its batch and by the number of replicas.
            share = tf.cast(tf.size(idx) * self.replicas, tf.float32) / tf.cast(
                stops[i] - starts[i], tf.float32
            )
            return to_float(x), y, tf.fill(tf.shape(idx), share)

        steps = tf.data.Dataset.range(len(self.bounds))
        if self.replicas == 1:
            return steps.map(batch).prefetch(tf.data.AUTOTUNE)
        # Every batch as its shares in replica order: the strategy hands consecutive elements to
        # its replicas in turn (a plain data set would be rebatched into contiguous halves,
        # unweighted).
        shares = steps.flat_map(
            lambda i: tf.data.Dataset.range(self.replicas).map(lambda r: batch(i, r))
        ).prefetch(tf.data.AUTOTUNE)
        return distribution_strategy().distribute_datasets_from_function(lambda _: shares)


def augment_batch(x: tf.Tensor, shifts: tf.Tensor, flips: tf.Tensor | None, pad: int) -> tf.Tensor:
    """Per image, a crop of the ``pad``-padded image back to its size at offset ``shifts`` (rows,
    columns), then a horizontal flip where ``flips`` is True (None: no flip).

    The padding is zeros on the 0..255 scale, i.e. black, as torchvision's RandomCrop(padding)
    before Normalize; the model normalises after.
    """
    if pad:
        h, w = x.shape[1], x.shape[2]
        padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        rows = shifts[:, 0:1] + tf.range(h, dtype=shifts.dtype)  # (B, H) rows to keep
        cols = shifts[:, 1:2] + tf.range(w, dtype=shifts.dtype)  # (B, W) columns to keep
        x = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    if flips is not None:
        x = tf.where(flips[:, None, None, None], tf.reverse(x, axis=[2]), x)
    return x


def to_float(x: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> the float32 0..255 the models take."""
    return tf.cast(x, tf.float32)
