"""One module per pipeline stage: validate inputs, open the MLflow run, write outputs atomically.

The real work happens in shrinkflow.data and shrinkflow.backends; these wrappers add lineage
(the run that produced a job's input is its source) and the per-node bookkeeping files.
"""

from pathlib import Path

from shrinkflow import tracking
from shrinkflow.nodes import NODE_FILE, read_node
from shrinkflow.outputs import write_json

__all__ = ["NODE_FILE", "job_config", "read_node", "write_node"]


def job_config(cfg: dict, seed: int) -> dict:
    """The params a backend job of a node trained with ``seed`` runs with: its ``seed`` is that
    training seed (weight init, batch order, random filter choice, calibration sample), where
    params' own ``seed`` is the split's, which only prepare reads. The MLflow run still logs
    the params as given; the node's seed is its ``shrinkflow.seed`` tag."""
    return {**cfg, "seed": int(seed)}


def write_node(folder: Path, node: dict, run_id: str, stage: str) -> None:
    """Label a model folder: what it is (node.json) and the MLflow run that wrote it (run.json)."""
    write_json(Path(folder) / NODE_FILE, node)
    tracking.write_run_ref(folder, run_id, stage)
