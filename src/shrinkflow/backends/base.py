"""The small interface every backend offers; stages talk to backends only through it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError

BACKENDS = ("torch",)

EpochCallback = Callable[[int, dict[str, float]], None]


class Backend(Protocol):
    name: str

    def list_models(self) -> list[str]: ...

    def count_params(self, model_name: str) -> int: ...

    def train_fingerprint(self, cfg: dict, model_name: str, data: PreparedData) -> str: ...

    def resumable_run_id(self, resume_dir: Path, fingerprint: str) -> str | None: ...

    def train_model(
        self,
        cfg: dict,
        model_name: str,
        data: PreparedData,
        out_dir: Path,
        resume_dir: Path,
        on_epoch: EpochCallback,
        run_id: str | None,
    ) -> Any: ...

    def prunable_weights(self, model_dir: Path) -> int:
        """How many conv and linear weights the model in ``model_dir`` has."""
        ...

    def resumable_prune_run_id(
        self,
        cfg: dict,
        method: str,
        sparsity: float,
        model_dir: Path,
        data: PreparedData,
        resume_dir: Path,
    ) -> str | None: ...

    def prune_model(
        self,
        cfg: dict,
        method: str,
        sparsity: float,
        model_dir: Path,
        data: PreparedData,
        out_dir: Path,
        resume_dir: Path,
        on_epoch: EpochCallback,
        run_id: str | None,
        sensitivity_dir: Path,
    ) -> dict: ...

    def finetune_fingerprint(self, cfg: dict, model_dir: Path, data: PreparedData) -> str: ...

    def finetune_model(
        self,
        cfg: dict,
        model_dir: Path,
        data: PreparedData,
        out_dir: Path,
        resume_dir: Path,
        on_epoch: EpochCallback,
        run_id: str | None,
    ) -> Any: ...

    def analyze_sensitivity(
        self, cfg: dict, model_dir: Path, data: PreparedData, out_dir: Path
    ) -> dict: ...

    def resumable_quantize_run_id(
        self, cfg: dict, method: str, model_dir: Path, data: PreparedData, resume_dir: Path
    ) -> str | None: ...

    def quantize_model(
        self,
        cfg: dict,
        method: str,
        model_dir: Path,
        data: PreparedData,
        out_dir: Path,
        resume_dir: Path,
        on_epoch: EpochCallback,
        run_id: str | None,
    ) -> dict:
        """Write the model in ``model_dir`` quantized by ``method`` (a ``quantize.methods``
        name) into ``out_dir``; return facts for the run (see the backend's docstring)."""
        ...

    def evaluate_model(
        self, cfg: dict, model_dir: Path, data: PreparedData, reference_dir: Path | None = None
    ) -> dict:
        """Measure the model in ``model_dir``; with ``reference_dir`` (the float model it was
        quantized from) also that model's size and speed, measured in the same process."""
        ...


def get_backend(name: str) -> Backend:
    """Import one backend on demand, so a job never pays for another framework's import."""
    if name not in BACKENDS:
        raise ShrinkflowError(f"backend: {name!r} is not one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"shrinkflow.backends.{name}").BACKEND


def check_model(backend: Backend, model_name: str) -> None:
    known = backend.list_models()
    if model_name not in known:
        raise ShrinkflowError(
            f"model: {model_name!r} is not available for backend {backend.name} "
            f"(known: {', '.join(known)})"
        )
