"""A TensorFlow model folder (Keras, fixed-point or TFLite) as a ``Predictor``, on evaluate's
loader, on the CPU (TFLite runs there)."""

from __future__ import annotations

from pathlib import Path

from shrinkflow.backends.predictor import Predictor
from shrinkflow.backends.tensorflow import tflite
from shrinkflow.backends.tensorflow.evaluate import load_subject, logits


def load_predictor(model_dir: Path) -> Predictor:
    """The model in ``model_dir``: its ``.tflite`` if it has one, else its Keras model, checked
    as evaluate checks it (node.json, Keras' safe mode behind shrinkflow's config check)."""
    subject = load_subject(Path(model_dir), "cpu", tflite.default_threads())
    return Predictor(subject.spec, lambda images, batch: logits(subject.runner_at(batch), images))
