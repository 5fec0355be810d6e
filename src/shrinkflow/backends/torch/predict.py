"""A torch model folder (float, fixed-point or int8) as a ``Predictor``, on evaluate's loader,
on the CPU (an int8 program runs on x86 CPUs only)."""

from __future__ import annotations

from pathlib import Path

import torch

from shrinkflow.backends.predictor import Predictor
from shrinkflow.backends.torch.evaluate import load_subject, logits
from shrinkflow.backends.torch.tensors import normalize


def load_predictor(model_dir: Path) -> Predictor:
    """The model in ``model_dir``, whichever kind of file it holds, checked as evaluate checks
    it (node.json, weights-only loading)."""
    subject = load_subject(Path(model_dir), torch.device("cpu"))
    mean, std = subject.spec["mean"], subject.spec["std"]
    return Predictor(
        subject.spec, lambda images, batch: logits(subject, normalize(images, mean, std), batch)
    )
