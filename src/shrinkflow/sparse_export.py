"""`shrinkflow export-sparse`: a model folder's weights as a ``sparse_format`` archive.

The file a user ships: every tensor at the precision the node's model file holds it (float32,
float16, int8 codes with scales and zero points, bit-packed fixed-point codes), pruned zeros
left out behind a bitmask. The index records the backend, the source file and its format, the
model spec and the node (``node.json``), so the archive says what it is without its folder.
Read it back with ``shrinkflow.sparse_format.load`` (numpy only); a torch float or
fixed-point export runs as a model through ``backends.torch.stored_weights.load_sparse_model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from shrinkflow import metrics, sparse_format
from shrinkflow.backends.base import backend_module
from shrinkflow.nodes import read_node
from shrinkflow.outputs import atomic_file


class Exported(NamedTuple):
    tensors: int  # how many tensors the archive holds
    file_bytes: int  # the archive
    source_bytes: int  # the node's model file, as deployed
    nominal_bytes: int  # sparse_format.nominal_bytes of the same tensors


def export(model_dir: Path, out: Path) -> Exported:
    """Write the archive of the model in ``model_dir`` (a folder with ``node.json``) to
    ``out``, atomically; one-line ShrinkflowErrors for a folder that is not a model's."""
    model_dir = Path(model_dir)
    node = read_node(model_dir)  # the folder holds the file its node.json promises
    tensors, meta = backend_module(node["backend"], "stored_weights").stored_weights(model_dir)
    with atomic_file(Path(out)) as scratch:
        sparse_format.save(scratch, tensors, {**meta, "node": node})
    return Exported(
        tensors=len(tensors),
        file_bytes=metrics.file_bytes(Path(out)),
        source_bytes=metrics.file_bytes(model_dir / meta["file"]),
        nominal_bytes=sparse_format.nominal_bytes(tensors),
    )
