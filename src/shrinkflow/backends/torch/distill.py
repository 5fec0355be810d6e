"""Knowledge distillation for torch runs: the loss (``distill_loss``) and the teacher that a
``trainer.Trainer`` asks for soft targets (``Teacher``). What the loss is and why: see
``shrinkflow.training.distill``."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model
from shrinkflow.data.prepared import PreparedData, check_fits, sha256_file
from shrinkflow.training.distill import Distill


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    hard_loss: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """``(1 - alpha) * hard_loss + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    the KL divergence summed over classes and averaged over the batch (as ``hard_loss`` is)."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    soft = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return (1.0 - alpha) * hard_loss + alpha * t * t * soft


class Teacher:
    """The float teacher of a distilled run, frozen in eval mode: ``loss`` turns a batch's
    ordinary loss into the distillation loss, the teacher fed the student's own (augmented)
    batch."""

    def __init__(self, model: nn.Module, alpha: float, temperature: float) -> None:
        self.model = model.eval().requires_grad_(False)
        self.alpha, self.temperature = float(alpha), float(temperature)

    def to(self, device: torch.device) -> Teacher:
        self.model.to(device)
        return self

    def loss(
        self, xb: torch.Tensor, student_logits: torch.Tensor, hard_loss: torch.Tensor
    ) -> torch.Tensor:
        if self.alpha == 0.0:  # the plain run, without paying for the teacher's forward pass
            return hard_loss
        with torch.no_grad():
            teacher_logits = self.model(xb)
        return distill_loss(student_logits, teacher_logits, hard_loss, self.alpha, self.temperature)


def load_teacher(plan: Distill | None, data: PreparedData) -> Teacher | None:
    """The teacher of ``plan`` (None: no distillation), checked to fit ``data``."""
    if plan is None:
        return None
    model, spec = load_model(plan.teacher_dir)
    check_fits(spec, data, plan.teacher_dir / MODEL_FILE)
    return Teacher(model, plan.alpha, plan.temperature)


def teacher_point(plan: Distill | None) -> dict[str, str]:
    """What a distilled run adds to its resume fingerprint's point: the teacher file's hash
    (its params are among the stage's params already). Nothing when it is not distilled, so
    that the fingerprint of a plain run is unchanged."""
    return {} if plan is None else {"teacher": sha256_file(Path(plan.teacher_dir) / MODEL_FILE)}
