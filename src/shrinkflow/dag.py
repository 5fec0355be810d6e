"""Where every DAG node lives on disk: one definition for the Snakefile, the tests and the CLI.

Imports nothing heavy: the Snakefile loads this module on every start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shrinkflow import per_backend

RESULTS = Path("results")
MODELS = RESULTS / "models"
SUMMARY = RESULTS / "summary.csv"
REPORT = RESULTS / "report"

RAW = "data/raw/{dataset}"
PREPARED = "data/prepared/{dataset}"

# Every training seed's chain (train -> prune -> fine-tune -> quantize -> evaluate) lives in its
# own folder below results/models/<backend>/<model>, on the one split that params' `seed` made.
SEED_FOLDER = "seed{seed}"

# A node's folder below results/models/<backend>/<model>/seed<k>, per DAG stage; `{source}` is the
# folder of the float model a quantized node was quantized from (the baseline's or a fine-tuned
# point's). The stage table (shrinkflow.stage_table) builds both DAG files' paths from these.
NODE_FOLDERS = {
    "baseline": "baseline",
    "pruned": "pruned/{method}/{sparsity}",
    "finetuned": "finetuned/{method}/{sparsity}",
    "quantized": "quantized/{qmethod}/{source}",
}

MODEL_DIR = "model"  # a node's model artefact, inside its folder
METRICS_FILE = "metrics.json"  # evaluate's record of a node, beside MODEL_DIR
SENSITIVITY = "sensitivity"  # a baseline's sensitivity sweep, beside its folder (same seed)

# The stages a quantized node can start from (the `{source}` wildcard of workflow/rules).
QUANTIZABLE_STAGES = ("baseline", "finetuned")


def raw_dir(dataset: str) -> Path:
    return Path(RAW.format(dataset=dataset))


def prepared_dir(dataset: str) -> Path:
    return Path(PREPARED.format(dataset=dataset))


@dataclass(frozen=True)
class Node:
    """One evaluated artefact of the DAG (a row of results/summary.csv).

    A quantized node keeps its source's prune method and sparsity: no prune method means it was
    quantized from the baseline, otherwise from that fine-tuned sweep point. ``seed`` is the
    training seed (a ``seeds`` entry) of the chain the node belongs to.
    """

    backend: str
    model: str
    stage: str
    seed: int = 0  # the only training seed of the default `seeds: [0]`
    prune_method: str = ""
    target_sparsity: float | None = None
    quant_method: str = ""

    @classmethod
    def from_record(cls, record: Mapping) -> Node:
        """The node a node.json / metrics.json record describes (other keys are ignored)."""
        return cls(
            backend=record["backend"],
            model=record["model"],
            stage=record["stage"],
            seed=int(record["seed"]),
            prune_method=record.get("prune_method") or "",
            target_sparsity=record.get("target_sparsity"),
            quant_method=record.get("quant_method") or "",
        )

    @property
    def subpath(self) -> PurePosixPath:
        """The folder relative to results/models/<backend>/<model>/seed<k>: `baseline`,
        `finetuned/l1_unstructured/0.5`, `quantized/static_int8/baseline`, ... (the `{node}` and
        `{source}` wildcards of workflow/rules)."""
        source = self.source.subpath if self.stage == "quantized" else ""
        return PurePosixPath(
            NODE_FOLDERS[self.stage].format(
                method=self.prune_method,
                sparsity=sparsity_label(self.target_sparsity),
                qmethod=self.quant_method,
                source=source,
            )
        )

    @property
    def label(self) -> str:
        """The folder relative to results/models:
        `torch/resnet20/seed0/finetuned/l1_unstructured/0.5`."""
        return f"{self.backend}/{self.model}/{seed_folder(self.seed)}/{self.subpath}"

    @property
    def point_label(self) -> str:
        """The label without the seed, the same for every training seed of one sweep point:
        `torch/resnet20/finetuned/l1_unstructured/0.5` (what a report aggregates seeds by)."""
        return f"{self.backend}/{self.model}/{self.subpath}"

    @property
    def folder(self) -> Path:
        return seed_dir(self.backend, self.model, self.seed) / self.subpath

    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_DIR

    @property
    def metrics(self) -> Path:
        return self.folder / METRICS_FILE

    @property
    def source(self) -> Node:
        """The node a quantized node was quantized from (evaluate's `--reference`)."""
        if self.stage != "quantized":
            raise ValueError(f"{self.label}: only quantized nodes have a source")
        if not self.prune_method:
            return baseline(self.backend, self.model, self.seed)
        return finetuned(
            self.backend, self.model, self.prune_method, self.target_sparsity, self.seed
        )


def sparsity_label(sparsity: float | None) -> str:
    """A sparsity as it appears in paths and wildcards: Python's repr, as DVC renders it."""
    return str(sparsity)


def seed_folder(seed: int) -> str:
    """The folder of a training seed's chain below results/models/<backend>/<model>: `seed0`."""
    return SEED_FOLDER.format(seed=seed)


def seed_dir(backend: str, model: str, seed: int) -> Path:
    """results/models/<backend>/<model>/seed<k>: every node trained with ``seed``."""
    return MODELS / backend / model / seed_folder(seed)


def baseline(backend: str, model: str, seed: int = 0) -> Node:
    return Node(backend=backend, model=model, stage="baseline", seed=seed)


def pruned(backend: str, model: str, method: str, sparsity: float, seed: int = 0) -> Node:
    return Node(backend, model, "pruned", seed, prune_method=method, target_sparsity=sparsity)


def finetuned(backend: str, model: str, method: str, sparsity: float, seed: int = 0) -> Node:
    return Node(backend, model, "finetuned", seed, prune_method=method, target_sparsity=sparsity)


def quantized(backend: str, model: str, qmethod: str, source: Node) -> Node:
    """``source`` (the baseline or a fine-tuned point of the same backend and model) quantized
    with ``qmethod``; the quantized node keeps the source's seed."""
    if source.stage not in QUANTIZABLE_STAGES or (source.backend, source.model) != (backend, model):
        raise ValueError(
            f"{source.label}: not a baseline or fine-tuned node of "
            f"{backend}/{model}, so it cannot be quantized into one"
        )
    return Node(
        backend,
        model,
        "quantized",
        source.seed,
        prune_method=source.prune_method,
        target_sparsity=source.target_sparsity,
        quant_method=qmethod,
    )


def sensitivity_dir(backend: str, model: str, seed: int = 0) -> Path:
    """The sensitivity sweep of the baseline trained with ``seed``."""
    return seed_dir(backend, model, seed) / SENSITIVITY


def evaluated_nodes(cfg: dict) -> list[Node]:
    """Every node the configured DAG evaluates, in a stable order. Per backend x model x
    training seed (in the order of ``backends``, the backend's ``models`` and ``seeds``): the
    baseline; its fine-tuned sweep points (the backend's prune methods x sparsity); then the
    quantized nodes, source by source (the baseline, then each fine-tuned point in that order)
    and, for each source, one per the backend's ``quantize.methods`` entry in list order. (A
    list applies to every backend, a mapping gives each its own: shrinkflow.per_backend.)
    """
    nodes = []
    for backend in cfg["backends"]:
        prune_methods = per_backend.entries(cfg, "prune.methods", backend)
        quant_methods = per_backend.entries(cfg, "quantize.methods", backend)
        for model in per_backend.entries(cfg, "models", backend):
            for seed in cfg["seeds"]:
                sources = [baseline(backend, model, seed)]
                sources.extend(
                    finetuned(backend, model, method, sparsity, seed)
                    for method in prune_methods
                    for sparsity in cfg["prune"]["sparsities"]
                )
                nodes.extend(sources)
                nodes.extend(
                    quantized(backend, model, qmethod, source)
                    for source in sources
                    for qmethod in quant_methods
                )
    return nodes


def sensitivity_dirs(cfg: dict) -> list[Path]:
    """Every sensitivity folder the configured DAG writes: one per backend x model x seed."""
    return [
        sensitivity_dir(backend, model, seed)
        for backend in cfg["backends"]
        for model in per_backend.entries(cfg, "models", backend)
        for seed in cfg["seeds"]
    ]


# Tag names from DESIGN.md section 6; a node's DAG stage is `shrinkflow.node`, because
# `shrinkflow.stage` names the job (train, prune, evaluate, ...) that the run records.
_TAG_NAMES = {
    "backend": "backend",
    "model": "model",
    "stage": "node",
    "seed": "seed",
    "prune_method": "method",
    "target_sparsity": "sparsity",
    "quant_method": "qmethod",
}


def node_tags(node: dict) -> dict[str, str]:
    """MLflow tags that identify a node:
    shrinkflow.backend/model/node/seed/method/sparsity/qmethod."""
    return {
        f"shrinkflow.{_TAG_NAMES[key]}": str(value)
        for key, value in node.items()
        if key in _TAG_NAMES and value not in (None, "")
    }


def node_label(node: Mapping) -> str:
    """How logs and run names show a node: its folder relative to results/models, e.g.
    `torch/resnet20/seed0/finetuned/l1_unstructured/0.5` or
    `torch/resnet20/seed0/quantized/static_int8/finetuned/l1_unstructured/0.5`."""
    return Node.from_record(node).label
