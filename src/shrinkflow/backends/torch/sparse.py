"""What unstructured sparsity buys on disk: the size of a real sparse encoding of a state dict.

A dense file stores a pruned weight as four zero bytes, so pruning alone leaves ``size_bytes``
unchanged and only gzip notices the zeros. The sparse encoding here is one a deployer could ship
and decode with numpy alone, one ``np.savez`` archive of four arrays:

- ``index``: UTF-8 JSON, per state-dict entry in order, its key, shape and whether it is sparse
  (floating tensors) or dense (others, such as BatchNorm's ``num_batches_tracked``, with their
  numpy dtype);
- ``mask``: one bit per floating-point value, set where it is non-zero (``np.packbits`` over the
  floating tensors concatenated in index order);
- ``values``: those non-zero values, float32, in the same order;
- ``dense``: the raw bytes of the other tensors, concatenated in index order.

Four arrays rather than two per tensor keep the archive's per-array headers (~250 bytes each)
from hiding, on small models, what the zeros save. Its size is that of the archive written to
memory, headers included. At sparsity s a float32 tensor costs about (1/32 + (1 - s)) of its
dense bytes: smaller than dense from about 3 % sparsity on, larger below it.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

GZIP_LEVEL = 9  # as metrics.gzip_bytes: the ``gzip -9`` figure the studies report


class SparseSize(NamedTuple):
    bytes: int  # the np.savez archive
    gzip_bytes: int  # the same archive after gzip -9


def sparse_arrays(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The four arrays of the sparse encoding of ``state_dict`` (see the module docstring)."""
    index, masks, values, dense = [], [], [], []
    for key, tensor in state_dict.items():
        t = tensor.detach().cpu()
        if t.is_floating_point():
            flat = t.reshape(-1)
            nonzero = flat != 0
            masks.append(nonzero.numpy())
            values.append(flat[nonzero].float().numpy())
            index.append({"key": key, "shape": list(t.shape), "sparse": True})
        else:
            array = np.ascontiguousarray(t.numpy())
            dense.append(array.tobytes())
            entry = {"key": key, "shape": list(t.shape), "sparse": False, "dtype": array.dtype.str}
            index.append(entry)
    return {
        "index": np.frombuffer(json.dumps(index).encode(), dtype=np.uint8),
        "mask": np.packbits(np.concatenate(masks) if masks else np.zeros(0, dtype=bool)),
        "values": np.concatenate(values) if values else np.zeros(0, dtype=np.float32),
        "dense": np.frombuffer(b"".join(dense), dtype=np.uint8),
    }


def sparse_bytes(state_dict: Mapping[str, torch.Tensor]) -> SparseSize:
    """Bytes of ``state_dict`` in the sparse encoding, plain and gzipped."""
    buffer = io.BytesIO()
    np.savez(buffer, **sparse_arrays(state_dict))
    archive = buffer.getvalue()
    return SparseSize(len(archive), len(gzip.compress(archive, GZIP_LEVEL, mtime=0)))
