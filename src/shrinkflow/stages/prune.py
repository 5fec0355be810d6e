"""`shrinkflow prune`: one sweep point (method x sparsity) from the trained baseline."""

from __future__ import annotations

from pathlib import Path

from shrinkflow.backends.base import (
    backend_module,
    check_prune_method,
    use_safe_training_kernels,
)
from shrinkflow.dag import node_label
from shrinkflow.data.prepared import load_prepared
from shrinkflow.errors import ShrinkflowError
from shrinkflow.gpu_slots import hold_gpu_slots
from shrinkflow.progress import say
from shrinkflow.stages import job_config, read_node
from shrinkflow.stages.model_job import model_job, resume_dir_for


def check_point(method: str, sparsity: float) -> None:
    """A sweep point the CLI can be asked for directly, so it is checked like params are."""
    from shrinkflow.config import schema

    methods = schema()["properties"]["prune"]["properties"]["methods"]["items"]["enum"]
    if method not in methods:
        raise ShrinkflowError(f"--method: {method!r} is not one of {', '.join(methods)}")
    if not 0 <= sparsity < 1:
        raise ShrinkflowError(f"--sparsity: {sparsity} is not in [0, 1)")


def run(
    cfg: dict,
    method: str,
    sparsity: float,
    model_dir: Path,
    data_dir: Path,
    sensitivity_dir: Path,
    out: Path,
) -> None:
    check_point(method, sparsity)
    parent = read_node(model_dir)
    rounds = cfg["prune"]["structured"]["rounds"]  # > 1: trains the shrunk model between rounds
    use_safe_training_kernels(parent, reshaped=method.startswith("structured") and rounds > 1)
    hold_gpu_slots(
        int(method.startswith("gradual_") or (method.startswith("structured") and rounds > 1))
    )
    seeded = job_config(cfg, parent["seed"])  # the baseline's training seed
    check_prune_method(parent["backend"], method, "--method")
    prune = backend_module(parent["backend"], "prune")
    data = load_prepared(data_dir)
    if method == "structured_sensitivity" and not (sensitivity_dir / "ratios.json").is_file():
        raise ShrinkflowError(f"--sensitivity {sensitivity_dir}: no ratios.json (run sensitivity)")
    node = {
        "backend": parent["backend"],
        "model": parent["model"],
        "stage": "pruned",
        "seed": parent["seed"],
        "prune_method": method,
        "target_sparsity": sparsity,
        # Structured pruning removes weights instead of zeroing them: evaluate measures the
        # sparsity of every descendant against the baseline's conv and linear weight count.
        "reference_prunable_weights": prune.prunable_weights(model_dir),
    }
    resume_dir = resume_dir_for(out)
    resumed = None  # only gradual pruning re-trains (and resumes); the others take seconds
    if method.startswith("gradual_"):
        fingerprint = prune.gradual_fingerprint(seeded, method, sparsity, model_dir, data)
        resume_state = backend_module(parent["backend"], "resume_state")
        resumed = resume_state.resumable_run_id(resume_dir, fingerprint)
    with model_job(cfg, "prune", node, out, model_dir, run_id=resumed) as job:
        job.facts = prune.prune_model(
            seeded,
            method,
            sparsity,
            model_dir,
            data,
            job.context,
            sensitivity_dir=sensitivity_dir,
        )
    say(
        f"prune {node_label(node)}: measured sparsity {job.facts['measured_sparsity']:.3f}, "
        f"val top-1 {job.facts['val_top1']:.4f}"
    )
