"""`shrinkflow prune`: one sweep point (method x sparsity) from the trained baseline."""

from __future__ import annotations

from pathlib import Path

from shrinkflow import tracking
from shrinkflow.backends.base import check_prune_method, get_backend
from shrinkflow.dag import node_label, node_tags
from shrinkflow.data.prepared import load_prepared
from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import atomic_dir, write_json
from shrinkflow.progress import say
from shrinkflow.stages import read_node, write_node
from shrinkflow.training import NO_VALIDATION_IMAGES


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
    check_prune_method(parent["backend"], method, "--method")
    backend = get_backend(parent["backend"])
    data = load_prepared(data_dir)
    if method == "structured_sensitivity" and not (sensitivity_dir / "ratios.json").is_file():
        raise ShrinkflowError(f"--sensitivity {sensitivity_dir}: no ratios.json (run sensitivity)")
    node = {
        "backend": parent["backend"],
        "model": parent["model"],
        "stage": "pruned",
        "prune_method": method,
        "target_sparsity": sparsity,
        # Structured pruning removes weights instead of zeroing them: evaluate measures the
        # sparsity of every descendant against the baseline's conv and linear weight count.
        "reference_prunable_weights": backend.prunable_weights(model_dir),
    }
    label = node_label(node)
    # Scratch beside the model (.dvcignore hides it), even for methods that never resume.
    (out.parent / "resume").mkdir(parents=True, exist_ok=True)
    with tracking.job_run(
        cfg,
        "prune",
        out=out,
        tags=node_tags(node),
        parent_run_id=tracking.read_run_ref(model_dir),
        run_id=backend.resumable_prune_run_id(
            cfg, method, sparsity, model_dir, data, out.parent / "resume"
        ),
        run_name=f"prune {label}",
    ) as job:
        with atomic_dir(out) as staging:
            facts = backend.prune_model(
                cfg,
                method,
                sparsity,
                model_dir,
                data,
                staging,
                out.parent / "resume",
                on_epoch=lambda step, metrics: job.log_metrics(metrics, step=step),
                run_id=job.run_id,
                sensitivity_dir=sensitivity_dir,
            )
            write_json(staging / "prune.json", facts, nan_means=NO_VALIDATION_IMAGES)
            write_node(staging, node, job.run_id, "prune")
        job.log_metrics({k: v for k, v in facts.items() if isinstance(v, int | float)})
        job.log_artifact(out)  # a folder keeps its name: artifacts/model/...
        say(
            f"prune {label}: measured sparsity {facts['measured_sparsity']:.3f}, "
            f"val top-1 {facts['val_top1']:.4f}"
        )
