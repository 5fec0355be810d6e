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
        return MODELS / self.backend / self.model / self.stage

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"


def baseline(backend: str, model: str) -> Node:
    return Node(backend=backend, model=model, stage="baseline")


def evaluated_nodes(cfg: dict) -> list[Node]:
    """Every node the configured DAG evaluates, in a stable order."""
    return [baseline(b, m) for b in cfg["backends"] for m in cfg["models"]]


def node_tags(node: dict) -> dict[str, str]:
    """MLflow tags for a node; its DAG stage becomes `shrinkflow.node`, because
    `shrinkflow.stage` names the job (train, evaluate, ...) that the run records."""
    return {
        ("shrinkflow.node" if key == "stage" else f"shrinkflow.{key}"): str(value)
        for key, value in node.items()
        if value not in (None, "")
    }
