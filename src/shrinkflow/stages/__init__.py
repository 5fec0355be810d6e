"""One module per pipeline stage: validate inputs, open the MLflow run, write outputs atomically.

The real work happens in shrinkflow.data and shrinkflow.backends; these wrappers add lineage
(the run that produced a job's input is its parent) and the per-node bookkeeping files.
"""

from pathlib import Path

from shrinkflow import tracking
from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import read_json, write_json

NODE_FILE = "node.json"


def read_node(model_dir: Path) -> dict:
    """What the model folder is (backend, model, DAG stage, sweep point), from its node.json."""
    node_file = Path(model_dir) / NODE_FILE
    if not node_file.is_file():
        raise ShrinkflowError(
            f"--in {model_dir}: not a model folder (no node.json); train it first"
        )
    return read_json(node_file)


def write_node(folder: Path, node: dict, run_id: str, stage: str) -> None:
    """Label a model folder: what it is (node.json) and the MLflow run that wrote it (run.json)."""
    write_json(Path(folder) / NODE_FILE, node)
    tracking.write_run_ref(folder, run_id, stage)
