"""Knowledge distillation (Hinton et al. 2015) as far as it is the same on every backend:
``finetune.distill`` read into a ``Distill`` plan, and the check that a ``--teacher`` folder is
the baseline the student came from.

A distilled run (fine-tuning, or QAT, which reads the same key) minimises, per image,

    (1 - alpha) * CE(student, label) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))

where CE is the run's ordinary loss (with ``train.label_smoothing``), the teacher is the float
baseline of the same backend, model and seed, in inference mode and without gradients, fed
the same augmented batch as the student. The T^2 keeps the soft term's gradient on the scale of
the hard one's whatever the temperature. Each backend's ``distill`` module computes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shrinkflow.errors import ShrinkflowError
from shrinkflow.nodes import read_node


@dataclass(frozen=True)
class Distill:
    """A distilled run: the soft term's weight ``alpha``, the ``temperature`` and the folder
    of the teacher model."""

    alpha: float
    temperature: float
    teacher_dir: Path


def distill_plan(cfg: Mapping, teacher_dir: Path | None) -> Distill | None:
    """``cfg["finetune"]["distill"]`` with the teacher's folder; None when distillation is off
    (the key null or absent). A one-line error when it is on and no teacher is given."""
    settings = cfg["finetune"].get("distill")
    if settings is None:
        return None
    alpha, temperature = float(settings["alpha"]), float(settings["temperature"])
    if not 0.0 <= alpha <= 1.0:
        raise ShrinkflowError(f"finetune.distill.alpha: {alpha} is not in [0, 1]")
    if not temperature > 0.0:
        raise ShrinkflowError(f"finetune.distill.temperature: {temperature} is not > 0")
    if teacher_dir is None:
        raise ShrinkflowError(
            "finetune.distill is set: --teacher <the baseline's model folder> is required"
        )
    return Distill(alpha, temperature, Path(teacher_dir))


def check_teacher(teacher_dir: Path, student: Mapping) -> None:
    """Refuse a ``--teacher`` folder that is not the float baseline of the ``student`` node's
    backend, model and seed (``read_node`` first checks that it is a valid model folder)."""
    teacher = read_node(teacher_dir)
    keys = ("backend", "model", "seed")
    if teacher["stage"] != "baseline" or any(teacher[k] != student[k] for k in keys):
        raise ShrinkflowError(
            f"--teacher {teacher_dir}: the {teacher['stage']} of {teacher['backend']} "
            f"{teacher['model']} seed {teacher['seed']}; the teacher must be the baseline of "
            f"{student['backend']} {student['model']} seed {student['seed']}"
        )
