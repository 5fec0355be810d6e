"""The small interface every backend offers; stages talk to backends only through it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError
from shrinkflow.quantization import FIXED_PREFIX, FLOAT_METHODS, INT8_METHODS, parse_quant_method

BACKENDS = ("torch", "tensorflow")

# What each backend implements, declared here so that a config is checked before any job runs
# (and without importing a framework). A method name means the same idea on every backend that
# has it; the structured (filter-removing) methods and QAT are torch's, TFLite's float
# conversions TensorFlow's.
PRUNE_METHODS: dict[str, tuple[str, ...]] = {
    "torch": (
        "l1_unstructured",
        "gradual_polynomial",
        "gradual_constant",
        "structured_l1",
        "structured_random",
        "structured_sensitivity",
    ),
    "tensorflow": ("l1_unstructured", "gradual_polynomial", "gradual_constant"),
}
# Families of shrinkflow.quantization method names.
QUANT_FAMILIES: dict[str, tuple[str, ...]] = {
    "torch": ("static", "dynamic", "qat", "fixed"),
    "tensorflow": ("static", "dynamic", "float", "fixed"),
}

EpochCallback = Callable[[int, dict[str, float]], None]


class Backend(Protocol):
    name: str

    def list_models(self) -> list[str]: ...

    def count_params(self, model_name: str) -> int: ...

    def train_fingerprint(self, cfg: dict, model_name: str, data: PreparedData) -> str: ...

    def resumable_run_id(self, resume_dir: Path, fingerprint: str) -> str | None: ...

    def worker_rank(self) -> int | None:
        """This process's rank when ``launch_workers`` started it, else None."""
        ...

    def launch_workers(self, argv: list[str], processes: int) -> None:
        """Run ``shrinkflow *argv`` in ``processes`` data-parallel workers on this node and wait
        for them; a ShrinkflowError when one fails (``train.distributed``)."""
        ...

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


# The smallest input side every registered model is tested with: the 8x8 scikit-learn digits.
MIN_IMAGE_SIZE = 8


def check_model_args(
    backend: str, name: str, known: list[str], num_classes: int, in_channels: int, image_size: int
) -> None:
    """What every backend's ``create_model`` checks before building ``name``."""
    if name not in known:
        raise ShrinkflowError(
            f"unknown model {name!r} for backend {backend} (known: {', '.join(known)})"
        )
    for arg, value, minimum in (
        ("num_classes", num_classes, 1),
        ("in_channels", in_channels, 1),
        ("image_size", image_size, MIN_IMAGE_SIZE),
    ):
        if value < minimum:
            raise ShrinkflowError(f"model {name!r}: {arg} {value} is not >= {minimum}")


def check_prune_method(backend: str, method: str, key: str) -> None:
    """A ShrinkflowError naming ``key`` if ``backend`` has no prune method ``method``."""
    if method not in PRUNE_METHODS[backend]:
        raise ShrinkflowError(
            f"{key}: {method!r} is not available for backend {backend} "
            f"(it has: {', '.join(PRUNE_METHODS[backend])})"
        )


def check_quant_method(backend: str, method: str, key: str) -> None:
    """A ShrinkflowError naming ``key`` if ``backend`` cannot quantize with ``method``."""
    family = parse_quant_method(method, key).family
    if family not in QUANT_FAMILIES[backend]:
        offered = [
            m
            for m in (*INT8_METHODS, *FLOAT_METHODS)
            if parse_quant_method(m).family in QUANT_FAMILIES[backend]
        ]
        if "fixed" in QUANT_FAMILIES[backend]:
            offered.append(f"{FIXED_PREFIX}<bits>")
        raise ShrinkflowError(
            f"{key}: {method!r} is not available for backend {backend} "
            f"(it has: {', '.join(offered)})"
        )


def check_model(backend: Backend, model_name: str) -> None:
    known = backend.list_models()
    if model_name not in known:
        raise ShrinkflowError(
            f"model: {model_name!r} is not available for backend {backend.name} "
            f"(known: {', '.join(known)})"
        )
