"""`shrinkflow evaluate`: measure one model artefact and write its metrics.json."""

from __future__ import annotations

from pathlib import Path

from shrinkflow import tracking
from shrinkflow.backends.base import backend_module
from shrinkflow.dag import node_label, node_tags
from shrinkflow.data.prepared import load_prepared
from shrinkflow.outputs import write_json
from shrinkflow.progress import say
from shrinkflow.stages import read_node
from shrinkflow.training import NO_VALIDATION_IMAGES


def run(
    cfg: dict, model_dir: Path, data_dir: Path, out: Path, reference_dir: Path | None = None
) -> None:
    node = read_node(model_dir)
    if reference_dir is not None:
        read_node(reference_dir)  # a model folder, checked before any measuring
    reference = node.pop("reference_prunable_weights", None)
    evaluate = backend_module(node["backend"], "evaluate")
    data = load_prepared(data_dir)
    with tracking.job_run(
        cfg,
        "evaluate",
        out=out,
        tags=node_tags(node),
        parent_run_id=tracking.read_run_ref(model_dir),
        run_name=f"evaluate {node_label(node)}",
    ) as job:
        metrics = evaluate.evaluate_model(cfg, model_dir, data, reference_dir)
        if reference:
            # zeroed or physically removed: the share of the baseline's weights that are gone
            metrics["measured_sparsity"] = 1.0 - metrics["prunable_nonzero"] / reference
        job.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        job.set_tags({k: str(v) for k, v in metrics.items() if isinstance(v, str)})
        record = {**node, **metrics, "run_id": job.run_id, "artifact": str(model_dir)}
        write_json(out, record, nan_means=NO_VALIDATION_IMAGES)
        say(
            f"evaluate {node_label(node)}: "
            f"top-1 {metrics['top1']:.4f}, {metrics['size_bytes']} bytes, "
            f"{metrics['latency_ms_b1']:.2f} ms at batch 1 in {metrics['runtime']}"
        )
