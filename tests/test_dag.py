"""shrinkflow.dag: where each node lives, how it is labelled and tagged, what is evaluated."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from shrinkflow import dag


def cfg(quantize_methods: list[str], seeds: tuple[int, ...] = (0,)) -> dict:
    return {
        "backends": ["torch"],
        "models": ["resnet20", "vgg16"],
        "seeds": list(seeds),
        "prune": {"methods": ["l1_unstructured", "structured_l1"], "sparsities": [0.5, 0.7]},
        "quantize": {"methods": quantize_methods},
    }


def test_unquantized_folders_and_labels_sit_below_the_seed_level():
    base = dag.baseline("torch", "resnet20")
    assert base.folder == Path("results/models/torch/resnet20/seed0/baseline")
    assert base.metrics == Path("results/models/torch/resnet20/seed0/baseline/metrics.json")
    point = dag.finetuned("torch", "resnet20", "l1_unstructured", 0.5, seed=2)
    assert point.model_dir == Path(
        "results/models/torch/resnet20/seed2/finetuned/l1_unstructured/0.5/model"
    )
    assert point.label == "torch/resnet20/seed2/finetuned/l1_unstructured/0.5"
    assert point.point_label == "torch/resnet20/finetuned/l1_unstructured/0.5"
    assert dag.pruned("torch", "resnet20", "l1_unstructured", 0.5).label == (
        "torch/resnet20/seed0/pruned/l1_unstructured/0.5"
    )
    record = {"backend": "torch", "model": "resnet20", "stage": "baseline", "seed": 1}
    assert dag.node_label(record) == "torch/resnet20/seed1/baseline"
    assert dag.sensitivity_dir("torch", "resnet20", 1) == Path(
        "results/models/torch/resnet20/seed1/sensitivity"
    )


def test_a_node_record_must_name_its_seed():
    with pytest.raises(KeyError, match="seed"):
        dag.Node.from_record({"backend": "torch", "model": "resnet20", "stage": "baseline"})


def test_a_quantized_node_lives_under_quantized_then_its_source():
    source = dag.finetuned("torch", "resnet20", "l1_unstructured", 0.5, seed=3)
    node = dag.quantized("torch", "resnet20", "static_int8", source)
    assert node.folder == Path(
        "results/models/torch/resnet20/seed3/quantized/static_int8/finetuned/l1_unstructured/0.5"
    )
    assert node.seed == 3
    assert node.model_dir == node.folder / "model"
    assert node.metrics == node.folder / "metrics.json"
    assert node.source == source
    from_baseline = dag.quantized(
        "torch", "resnet20", "fixed_w4", dag.baseline("torch", "resnet20")
    )
    assert str(from_baseline.subpath) == "quantized/fixed_w4/baseline"
    assert from_baseline.source == dag.baseline("torch", "resnet20")
    assert (from_baseline.prune_method, from_baseline.target_sparsity) == ("", None)


def test_quantized_node_label_and_tags_from_its_node_record():
    """Stages label and tag nodes from the node.json record, which carries extra keys."""
    source = dag.finetuned("torch", "resnet20", "l1_unstructured", 0.5)
    record = {
        **asdict(dag.quantized("torch", "resnet20", "static_int8", source)),
        "reference_prunable_weights": 1000,
    }
    assert dag.node_label(record) == (
        "torch/resnet20/seed0/quantized/static_int8/finetuned/l1_unstructured/0.5"
    )
    assert dag.Node.from_record(record).source == source
    assert dag.node_tags(record) == {
        "shrinkflow.backend": "torch",
        "shrinkflow.model": "resnet20",
        "shrinkflow.node": "quantized",
        "shrinkflow.seed": "0",
        "shrinkflow.method": "l1_unstructured",
        "shrinkflow.sparsity": "0.5",
        "shrinkflow.qmethod": "static_int8",
    }
    baseline_record = asdict(
        dag.quantized("torch", "vgg16", "qat_int8", dag.baseline("torch", "vgg16"))
    )
    assert dag.node_label(baseline_record) == "torch/vgg16/seed0/quantized/qat_int8/baseline"
    assert dag.node_tags(baseline_record) == {
        "shrinkflow.backend": "torch",
        "shrinkflow.model": "vgg16",
        "shrinkflow.node": "quantized",
        "shrinkflow.seed": "0",
        "shrinkflow.qmethod": "qat_int8",
    }


@pytest.mark.parametrize(
    "source",
    [
        dag.pruned("torch", "resnet20", "l1_unstructured", 0.5),  # only fine-tuned points
        dag.baseline("torch", "vgg16"),  # another model's baseline
        dag.quantized("torch", "resnet20", "fixed_w8", dag.baseline("torch", "resnet20")),
    ],
)
def test_only_a_baseline_or_finetuned_node_of_the_same_model_can_be_quantized(source):
    with pytest.raises(ValueError, match="cannot be quantized"):
        dag.quantized("torch", "resnet20", "static_int8", source)


def test_only_quantized_nodes_have_a_source():
    with pytest.raises(ValueError, match="torch/resnet20/seed0/baseline: only quantized nodes"):
        _ = dag.baseline("torch", "resnet20").source


def test_evaluated_nodes_order_sources_first_then_quantized_source_by_source():
    nodes = dag.evaluated_nodes(cfg(["static_int8", "fixed_w4"]))
    sources, methods, models = 1 + 2 * 2, 2, 2
    assert len(nodes) == models * sources * (1 + methods)
    resnet20 = [n.label.removeprefix("torch/resnet20/seed0/") for n in nodes[: len(nodes) // 2]]
    assert resnet20 == [
        "baseline",
        "finetuned/l1_unstructured/0.5",
        "finetuned/l1_unstructured/0.7",
        "finetuned/structured_l1/0.5",
        "finetuned/structured_l1/0.7",
        "quantized/static_int8/baseline",
        "quantized/fixed_w4/baseline",
        "quantized/static_int8/finetuned/l1_unstructured/0.5",
        "quantized/fixed_w4/finetuned/l1_unstructured/0.5",
        "quantized/static_int8/finetuned/l1_unstructured/0.7",
        "quantized/fixed_w4/finetuned/l1_unstructured/0.7",
        "quantized/static_int8/finetuned/structured_l1/0.5",
        "quantized/fixed_w4/finetuned/structured_l1/0.5",
        "quantized/static_int8/finetuned/structured_l1/0.7",
        "quantized/fixed_w4/finetuned/structured_l1/0.7",
    ]
    assert {n.model for n in nodes[len(nodes) // 2 :]} == {"vgg16"}
    assert len({n.folder for n in nodes}) == len(nodes)


def test_an_empty_method_list_evaluates_no_quantized_node():
    nodes = dag.evaluated_nodes(cfg([]))
    assert len(nodes) == 2 * (1 + 2 * 2)
    assert all(n.stage in ("baseline", "finetuned") for n in nodes)


def test_each_seed_repeats_every_node_of_a_model_in_its_own_folder():
    one, two = (
        dag.evaluated_nodes(cfg(["static_int8"])),
        dag.evaluated_nodes(cfg(["static_int8"], (0, 1))),
    )
    per_model = len(one) // 2
    assert len(two) == 2 * len(one)
    # backend, model, seed: resnet20's seed-0 chain, its seed-1 chain, then vgg16's
    chains = [two[i : i + per_model] for i in range(0, len(two), per_model)]
    assert [(c[0].model, c[0].seed) for c in chains] == [
        ("resnet20", 0),
        ("resnet20", 1),
        ("vgg16", 0),
        ("vgg16", 1),
    ]
    for chain in chains:
        assert {n.seed for n in chain} == {chain[0].seed}
        prefix = f"results/models/torch/{chain[0].model}/seed{chain[0].seed}/"
        assert all(n.folder.as_posix().startswith(prefix) for n in chain)
    assert [n.point_label for n in chains[1]] == [n.point_label for n in chains[0]]
    assert [n for n in two if n.seed == 0] == one
    assert len({n.folder for n in two}) == len(two)
    assert [p.as_posix() for p in dag.sensitivity_dirs(cfg([], (0, 1)))] == [
        f"results/models/torch/{model}/seed{seed}/sensitivity"
        for model in ("resnet20", "vgg16")
        for seed in (0, 1)
    ]
