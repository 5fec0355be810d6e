"""Where every DAG node lives on disk: one definition for the Snakefile, the tests and the CLI.

Imports nothing heavy: the Snakefile loads this module on every start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESULTS = Path("results")
MODELS = RESULTS / "models"
SUMMARY = RESULTS / "summary.csv"


def raw_dir(dataset: str) -> Path:
    return Path("data/raw") / dataset


def prepared_dir(dataset: str) -> Path:
    return Path("data/prepared") / dataset


@dataclass(frozen=True)
class Node:
    """One evaluated artefact of the DAG (a row of results/summary.csv)."""

    backend: str
    model: str
    stage: str
    prune_method: str = ""
    target_sparsity: float | None = None
    quant_method: str = ""

    @property
    def folder(self) -> Path:
        base = MODELS / self.backend / self.model / self.stage
        if self.stage == "baseline":
            return base
        return base / self.prune_method / sparsity_label(self.target_sparsity)

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"


def sparsity_label(sparsity: float | None) -> str:
    """A sparsity as it appears in paths and wildcards: Python's repr, as DVC renders it."""
    return str(sparsity)


def baseline(backend: str, model: str) -> Node:
    return Node(backend=backend, model=model, stage="baseline")


def pruned(backend: str, model: str, method: str, sparsity: float) -> Node:
    return Node(backend, model, "pruned", prune_method=method, target_sparsity=sparsity)


def finetuned(backend: str, model: str, method: str, sparsity: float) -> Node:
    return Node(backend, model, "finetuned", prune_method=method, target_sparsity=sparsity)


def sensitivity_dir(backend: str, model: str) -> Path:
    return MODELS / backend / model / "sensitivity"


def evaluated_nodes(cfg: dict) -> list[Node]:
    """Every node the configured DAG evaluates, in a stable order: each baseline, then its
    fine-tuned sweep points (method x sparsity)."""
    nodes = []
    for backend in cfg["backends"]:
        for model in cfg["models"]:
            nodes.append(baseline(backend, model))
            nodes.extend(
                finetuned(backend, model, method, sparsity)
                for method in cfg["prune"]["methods"]
                for sparsity in cfg["prune"]["sparsities"]
            )
    return nodes


# Tag names from DESIGN.md section 6; a node's DAG stage is `shrinkflow.node`, because
# `shrinkflow.stage` names the job (train, prune, evaluate, ...) that the run records.
_TAG_NAMES = {
    "backend": "backend",
    "model": "model",
    "stage": "node",
    "prune_method": "method",
    "target_sparsity": "sparsity",
    "quant_method": "qmethod",
}


def node_tags(node: dict) -> dict[str, str]:
    """MLflow tags that identify a node: shrinkflow.backend/model/node/method/sparsity/qmethod."""
    return {
        f"shrinkflow.{_TAG_NAMES[key]}": str(value)
        for key, value in node.items()
        if key in _TAG_NAMES and value not in (None, "")
    }


def node_label(node: dict) -> str:
    """`torch/resnet20/finetuned/l1_unstructured/0.5`: how logs and run names show a node."""
    parts = [node["backend"], node["model"], node["stage"]]
    if node.get("prune_method"):
        parts += [node["prune_method"], sparsity_label(node["target_sparsity"])]
    return "/".join(parts)
