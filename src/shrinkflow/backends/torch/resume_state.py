"""The resume state of a torch training run: ``state.pt`` in the job's resume folder.

One file, written atomically by ``torch.save`` after every epoch and read back by the
weights-only unpickler (a planted state must not run code: it is refused): the loop's progress
fields (``training.loop.train_epochs``) plus the run's own state (``trainer.Trainer.snapshot``:
weights, BN statistics, optimizer momentum, scheduler position, GradScaler, RNGs, a stateful step
hook) and the best epoch's weights. Matching and reading: ``training.resume``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from shrinkflow.backends.torch.artifact import MODEL_FILE, load_tensor_file
from shrinkflow.data.prepared import PreparedData
from shrinkflow.outputs import atomic_file
from shrinkflow.training import resume

STATE_FILE = "state.pt"
# Bumped whenever the resume state's layout or the training procedure changes, so that an old
# state is never resumed by code that would continue it differently.
STATE_FORMAT = "shrinkflow.torch.train-state/2"


@dataclass
class StateFile:
    """``state.pt`` in ``resume_dir``, its tensors loaded onto ``device``."""

    resume_dir: Path
    device: torch.device | str = "cpu"
    state_format: ClassVar[str] = STATE_FORMAT

    @property
    def path(self) -> Path:
        return Path(self.resume_dir) / STATE_FILE

    def read(self) -> Any:
        return load_tensor_file(self.path, self.device, "resume state")

    def write(self, state: dict[str, Any]) -> None:
        with atomic_file(self.path) as tmp:
            torch.save(state, tmp)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


def job_fingerprint(
    stage: str, cfg: dict, point: dict[str, Any], data: PreparedData, model_dir: Path | None = None
) -> str:
    """``training.resume.job_fingerprint`` with this backend's state format and model file."""
    model_file = None if model_dir is None else Path(model_dir) / MODEL_FILE
    return resume.job_fingerprint(stage, cfg, point, STATE_FORMAT, data, model_file)


def train_fingerprint(cfg: dict, model_name: str, data: PreparedData) -> str:
    """Hash of all that decides the trained weights: a resume state is reused only on a match."""
    return job_fingerprint("train", cfg, {"model": model_name}, data)


def resumable_run_id(resume_dir: Path, fingerprint: str) -> str | None:
    """The MLflow run id saved with a resume state matching ``fingerprint``, else None."""
    return resume.resumable_run_id(StateFile(Path(resume_dir)), fingerprint)
