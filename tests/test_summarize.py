"""`shrinkflow summarize` gathers exactly the configured DAG's nodes, quantized ones included."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from shrinkflow import dag
from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import write_json
from shrinkflow.stages.summarize import collect_rows

CFG = {
    "backends": ["torch"],
    "models": ["resnet20"],
    "seeds": [0],
    "prune": {"methods": ["l1_unstructured"], "sparsities": [0.5]},
    "quantize": {"methods": ["static_int8", "fixed_w8"]},
}


def write_metrics(models_dir: Path, node: dag.Node, top1: float) -> None:
    path = models_dir / node.metrics.relative_to(dag.MODELS)
    path.parent.mkdir(parents=True)
    write_json(path, {**asdict(node), "top1": top1})


def test_rows_follow_the_dag_order_and_ignore_stale_quantized_folders(tmp_path):
    for i, node in enumerate(dag.evaluated_nodes(CFG)):
        write_metrics(tmp_path, node, top1=i / 10)
    stale = dag.quantized("torch", "resnet20", "qat_int8", dag.baseline("torch", "resnet20"))
    write_metrics(tmp_path, stale, top1=0.99)  # a method since removed from quantize.methods
    rows = collect_rows(CFG, tmp_path)
    assert [(r["stage"], r["prune_method"], r["quant_method"]) for r in rows] == [
        ("baseline", "", ""),
        ("finetuned", "l1_unstructured", ""),
        ("quantized", "", "static_int8"),
        ("quantized", "", "fixed_w8"),
        ("quantized", "l1_unstructured", "static_int8"),
        ("quantized", "l1_unstructured", "fixed_w8"),
    ]
    assert [r["top1"] for r in rows] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


def test_a_missing_quantized_metrics_file_is_named(tmp_path):
    for node in dag.evaluated_nodes(CFG)[:-1]:
        write_metrics(tmp_path, node, top1=0.5)
    with pytest.raises(ShrinkflowError, match=r"quantized/fixed_w8/finetuned/l1_unstructured/0\.5"):
        collect_rows(CFG, tmp_path)


def test_top1_after_pruning_and_the_runs_experiment_reach_the_summary(tmp_path):
    """Evaluate's record carries both (a fine-tuned node's node.json has its pruned model's
    val top-1); a baseline has no pruned model, so its cell is empty."""
    for node in dag.evaluated_nodes(CFG):
        path = tmp_path / node.metrics.relative_to(dag.MODELS)
        path.parent.mkdir(parents=True)
        pruned = {"pruned_val_top1": 0.81} if node.prune_method else {}
        write_json(path, {**asdict(node), "top1": 0.9, "experiment_id": "4", **pruned})
    rows = collect_rows(CFG, tmp_path)
    assert [r["pruned_val_top1"] for r in rows] == ["", 0.81, "", "", 0.81, 0.81]
    assert {r["experiment_id"] for r in rows} == {"4"}


def test_every_row_carries_its_training_seed(tmp_path):
    cfg = {**CFG, "seeds": [0, 3]}
    for node in dag.evaluated_nodes(cfg):
        write_metrics(tmp_path, node, top1=0.5)
    rows = collect_rows(cfg, tmp_path)
    per_seed = len(dag.evaluated_nodes(CFG))
    assert [r["seed"] for r in rows] == [0] * per_seed + [3] * per_seed
    assert (tmp_path / "torch/resnet20/seed3/quantized/fixed_w8/baseline/metrics.json").is_file()
