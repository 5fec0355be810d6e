"""`shrinkflow evaluate`: measure one model artefact and write its metrics.json.

Its MLflow run is the artefact's row in the experiment a user compares (``tracking.experiment``):
named by what the artefact is (``artefact_name``), the sweep's axes as params
(``artefact_axes``), every finite measurement as a metric under the name evaluate gives it,
and a link to the run that wrote the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from shrinkflow import tracking
from shrinkflow.backends.base import backend_module
from shrinkflow.dag import Node, node_label, node_tags, seed_folder, sparsity_label
from shrinkflow.data.prepared import load_prepared
from shrinkflow.outputs import write_json
from shrinkflow.progress import say
from shrinkflow.stages import read_node
from shrinkflow.training import NO_VALIDATION_IMAGES


def artefact_name(node: Mapping) -> str:
    """The artefact's run name: `torch/resnet20 baseline seed0`,
    `torch/resnet20 l1_unstructured 0.7 seed0`, `torch/resnet20 l1_unstructured 0.7 static_int8
    seed0`, `torch/resnet20 baseline static_int8 seed0` (quantized from the baseline)."""
    point = Node.from_record(node)
    source = "baseline"
    if point.prune_method:
        source = f"{point.prune_method} {sparsity_label(point.target_sparsity)}"
    parts = (f"{point.backend}/{point.model}", source, point.quant_method, seed_folder(point.seed))
    return " ".join(part for part in parts if part)


def artefact_axes(cfg: dict, node: Mapping) -> dict[str, object]:
    """The artefact run's params: where the artefact sits in the sweep. Every artefact has every
    axis, so the Compare view can plot them all: a model that was not pruned has prune method
    `none` and target sparsity 0 (as report/nodes.csv draws the baseline), one that was not
    quantized quant method `none`."""
    point = Node.from_record(node)
    return {
        "backend": point.backend,
        "model": point.model,
        "stage": point.stage,
        "prune_method": point.prune_method or "none",
        "target_sparsity": point.target_sparsity or 0.0,
        "quant_method": point.quant_method or "none",
        "seed": point.seed,
        "dataset": cfg["data"]["name"],
    }


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
        source_run_id=tracking.read_run_ref(model_dir),
        run_name=artefact_name(node),
        axes=artefact_axes(cfg, node),
    ) as job:
        metrics = evaluate.evaluate_model(cfg, model_dir, data, reference_dir)
        if reference:
            # zeroed or physically removed: the share of the baseline's weights that are gone
            metrics["measured_sparsity"] = 1.0 - metrics["prunable_nonzero"] / reference
        # A figure that could not be measured (val_top1 without validation images) is absent.
        job.log_metrics(
            {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        )
        job.set_tags({k: str(v) for k, v in metrics.items() if isinstance(v, str)})
        record = {
            **node,
            **metrics,
            "run_id": job.run_id,
            "experiment_id": job.experiment_id,  # the report links the run's page by both
            "artifact": str(model_dir),
        }
        write_json(out, record, nan_means=NO_VALIDATION_IMAGES)
        say(
            f"evaluate {node_label(node)}: "
            f"top-1 {metrics['top1']:.4f}, {metrics['size_bytes']} bytes, "
            f"{metrics['latency_ms_b1']:.2f} ms at batch 1 in {metrics['runtime']}"
        )
