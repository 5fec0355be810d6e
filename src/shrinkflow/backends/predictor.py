"""A loaded model as a function of raw images: what the registered models' MLflow pyfunc calls.

Each backend's ``predict.load_predictor`` builds one from a model folder with the loaders
``evaluate`` uses; this class checks the images and picks the batch size, the same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shrinkflow.errors import ShrinkflowError

# Images are scored in batches of at most this many (the last one zero-padded where a
# program runs at one batch size only: a torch int8 program, a TFLite interpreter).
PREDICT_BATCH = 64


@dataclass(frozen=True)
class Predictor:
    """``spec``: the model's spec (``arch``, ``num_classes``, ``in_channels``, ``image_size``,
    ``mean``, ``std``, ``classes``). ``logits``: uint8 images and a batch size -> logits."""

    spec: dict[str, Any]
    logits: Callable[[np.ndarray, int], np.ndarray]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C): one image as ``data/prepared`` stores it."""
        side = self.spec["image_size"]
        return (side, side, self.spec["in_channels"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 logits (N, num_classes) of uint8 pixels (N, H, W, C), 0..255, unnormalised
        (each model normalises its input as its spec says)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.input_shape:
            height, width, channels = self.input_shape
            raise ShrinkflowError(
                f"predict: images of dtype {images.dtype} and shape {images.shape}, but "
                f"{self.spec['arch']} takes uint8 images (N, {height}, {width}, {channels})"
            )
        if not len(images):
            return np.zeros((0, self.spec["num_classes"]), np.float32)
        return self.logits(images, min(len(images), PREDICT_BATCH)).astype(np.float32)
