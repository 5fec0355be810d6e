"""What every backend offers, and the one lookup through which stages reach it.

A backend is a package of job modules with the SAME names and the same public functions on
every backend, so the twins can be read side by side: ``shrinkflow prune`` -> ``cli.py`` ->
``stages/prune.py`` -> ``backends/<backend>/prune.py``. ``backend_module`` imports one job
module of one backend on demand, so a job never pays for (or loads) another framework.
``JOB_MODULES`` lists what each job module must offer; ``tests/test_backend_twins.py`` checks
that both backends do, with the same parameters. A framework is imported only under its own
backend (ruff's TID251, configured in pyproject.toml and the backends' ruff.toml).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from shrinkflow import warm
from shrinkflow.errors import ShrinkflowError
from shrinkflow.quantization import FIXED_PREFIX, FLOAT_METHODS, INT8_METHODS, parse_quant_method

BACKENDS = ("torch", "tensorflow")

# What each backend implements, declared here so that a config is checked before any job runs
# (and without importing a framework). A method name means the same idea on every backend that
# has it; both have every prune method and QAT, only TensorFlow TFLite's float conversions.
PRUNE_METHODS: dict[str, tuple[str, ...]] = {
    backend: (
        "l1_unstructured",
        "gradual_polynomial",
        "gradual_constant",
        "structured_l1",
        "structured_random",
        "structured_sensitivity",
    )
    for backend in BACKENDS
}
# The models each backend's registry builds (backends/<backend>/models.py ``list_models``,
# kept equal by tests/test_backend_twins.py), declared here so that a config is checked without
# importing a framework. Any other model is a ``custom_models`` entry (shrinkflow.custom_models).
REGISTRY_MODELS: dict[str, tuple[str, ...]] = {
    backend: (
        "googlenet",
        "resnet18",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet50",
        "resnet56",
        "vgg16",
        "vgg16_bn",
    )
    for backend in BACKENDS
}
# Families of shrinkflow.quantization method names.
QUANT_FAMILIES: dict[str, tuple[str, ...]] = {
    "torch": ("static", "dynamic", "qat", "fixed"),
    "tensorflow": ("static", "dynamic", "qat", "float", "fixed"),
}


EpochCallback = Callable[[int, dict[str, float]], None]


def _ignore_epoch(step: int, metrics: dict[str, float]) -> None:
    """The default per-epoch callback: nothing to log (a direct call, a follower process)."""


@dataclass(frozen=True)
class JobContext:
    """What a stage hands a backend job besides the job's own arguments: the (staging) folder
    to write the model into, the folder that keeps its resume state, the callback that logs
    each epoch's (or round's) metrics, and the MLflow run id saved with a resume state."""

    out_dir: Path
    resume_dir: Path
    on_epoch: EpochCallback = _ignore_epoch
    run_id: str | None = None

    def fit_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a backend's ``train.fit`` that come from the job."""
        return {
            "out_dir": Path(self.out_dir),
            "resume_dir": Path(self.resume_dir),
            "on_epoch": self.on_epoch,
            "run_id": self.run_id,
        }


# Every backend's job modules (backends/<backend>/<module>.py), the public functions each must
# offer and what for. Both backends define them with the same parameters in the same order
# (tests/test_backend_twins.py), so a stage calls either the same way and the twins read side
# by side; docs/architecture.md says what each function takes and returns.
JOB_MODULES: dict[str, tuple[str, ...]] = {
    # the model registry; `shrinkflow models` lists the parameter counts
    "models": ("list_models", "create_model", "model_params"),
    # a node's model files and the spec that says what a model expects
    "artifact": ("save_model", "load_model"),
    # data-parallel training on one node (train.distributed)
    "distributed": ("worker_rank", "launch"),
    # `shrinkflow train`
    "train": ("train_model",),
    # the resume state every re-training job keeps (train, finetune, gradual pruning, QAT)
    "resume_state": ("train_fingerprint", "resumable_run_id"),
    # `shrinkflow finetune`: re-training with the pruned weights held
    "finetune": ("finetune_fingerprint", "finetune_model"),
    # `shrinkflow prune`: every method of PRUNE_METHODS[backend]; only gradual ones resume
    "prune": ("prunable_weights", "gradual_fingerprint", "prune_model"),
    # `shrinkflow sensitivity` (its files: shrinkflow.sensitivity_report)
    "sensitivity": ("analyze_sensitivity",),
    # `shrinkflow quantize`: every family of QUANT_FAMILIES[backend]; only QAT resumes
    "quantize": ("resumable_quantize_run_id", "quantize_model"),
    # `shrinkflow evaluate`: a model, and with a reference the float model it came from
    "evaluate": ("evaluate_model",),
    # a model's weights at their stored precision (shrinkflow.sparse_format): evaluate's
    # nominal and sparse sizes, `shrinkflow export-sparse`
    "stored_weights": ("stored_weights", "encoding_sizes"),
    # a model folder as a function of raw images: the registered models' MLflow pyfunc
    # (shrinkflow.tracking.pyfunc_model)
    "predict": ("load_predictor",),
}


# TensorFlow 2.21's oneDNN CPU kernels corrupt the heap while training convolutions of some
# irregular widths: a ResNet-20 filter-pruned to 5-21 filters per layer aborts in its second
# fine-tuning epoch ("corrupted size vs. prev_size", exit 134/139), every time; with
# TF_ENABLE_ONEDNN_OPTS=0 (Eigen's kernels) it trains, to the same loss. The registry's widths
# train correctly with oneDNN, about twice as fast on 2 cores, so only a job that trains a model
# of other widths (filter-pruned, or a custom model) falls back. A value the user set is kept.
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def use_safe_training_kernels(node: Mapping[str, Any], reshaped: bool = False) -> None:
    """Before a TensorFlow job that trains ``node``'s model (``reshaped``: one this job will
    filter-prune and train) imports TensorFlow: Eigen's kernels for irregular widths. (In a
    warm child TensorFlow is imported already, so the job is handed back: shrinkflow.warm.)"""
    if node["backend"] != "tensorflow":
        return
    method = str(node.get("prune_method") or "")
    if (
        reshaped
        or method.startswith("structured")
        or node["model"] not in REGISTRY_MODELS["tensorflow"]
    ) and ONEDNN_ENV not in os.environ:  # the user's setting wins
        os.environ[ONEDNN_ENV] = "0"
        warm.require_imported_with([ONEDNN_ENV])


# Snakemake sets it to the rule's threads (stage_table.Stage.threads) for every job; a user may.
THREADS_ENV = "OMP_NUM_THREADS"


def job_threads() -> int | None:
    """The CPU threads this job computes with, where its environment says
    (``OMP_NUM_THREADS``, a positive integer); None: the framework's default (every CPU)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def use_job_threads() -> None:
    """Apply ``job_threads`` to every backend this process has loaded (each backend package's
    ``use_job_threads``; a fresh process's frameworks take it when they load). For a warm child
    (shrinkflow.warm), whose frameworks were imported before it had a job."""
    for backend in BACKENDS:
        package = sys.modules.get(f"shrinkflow.backends.{backend}")
        if package is not None:
            package.use_job_threads()


def backend_module(backend: str, job: str) -> ModuleType:
    """``shrinkflow.backends.<backend>.<job>``, imported on first use (with its framework).

    ``job`` is a key of ``JOB_MODULES``; the module offers that key's functions.
    """
    if backend not in BACKENDS:
        raise ShrinkflowError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if job not in JOB_MODULES:
        raise ValueError(f"{job!r} is not a backend job module ({', '.join(JOB_MODULES)})")
    return importlib.import_module(f"shrinkflow.backends.{backend}.{job}")


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


# Where magnitude pruning ranks weights: across all pruned layers at once, or within each.
SCOPES = ("global", "layer")


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ShrinkflowError(f"prune.sparsities: {sparsity} is not in [0, 1)")


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ShrinkflowError(f"prune.scope: {scope!r} is not one of {', '.join(SCOPES)}")


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
        raise ShrinkflowError(
            f"{key}: {method!r} is not available for backend {backend} "
            f"(it has: {', '.join(quant_methods(backend))})"
        )


def quant_methods(backend: str) -> list[str]:
    """The quantization method names ``backend`` offers, ``fixed_w<bits>`` for every width."""
    offered = [
        m
        for m in (*INT8_METHODS, *FLOAT_METHODS)
        if parse_quant_method(m).family in QUANT_FAMILIES[backend]
    ]
    if "fixed" in QUANT_FAMILIES[backend]:
        offered.append(f"{FIXED_PREFIX}<bits>")
    return offered
