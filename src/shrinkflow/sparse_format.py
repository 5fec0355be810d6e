"""What sparsity really buys: a model's weights in one sparse archive, each at its precision.

A dense file stores a pruned weight at full width, so pruning alone leaves ``size_bytes``
unchanged and only gzip notices the zeros. This module is the encoding a deployer could ship
and decode with numpy alone, for every kind of artefact shrinkflow writes, built from
``StoredTensor``s (each backend's ``stored_weights`` module makes them from a model folder):

- floating values (float32, float16), stored as they are;
- integer codes with a scale and zero point (int8 weights, per tensor or per channel along
  ``axis``; int32 biases of a full-integer TFLite file): ``value = (code - zero_point) * scale``;
- ``bits``-bit fixed-point codes (``shrinkflow.bitpack``): bit-packed at ``bits`` bits each,
  with one float32 scale per channel, ``value = code * scale``;
- any other array (BatchNorm statistics, int64 counters) raw.

A tensor marked ``sparse`` keeps a bitmask of its non-zero codes (a code is "zero" when it
stands for the value 0: the zero point of quantized codes, 0 otherwise) and only those codes;
the others are stored dense.

Layout: one uncompressed ``np.savez`` archive, readable with ``np.load(allow_pickle=False)``.

- ``index``: UTF-8 JSON ``{"format": FORMAT, "meta": {...}, "tensors": [...]}``; per tensor in
  order its ``key``, ``shape``, ``dtype`` (numpy name of the codes or values), ``sparse`` and,
  where they apply, ``bits``, ``axis`` (of per-channel scales; absent: one scale),
  ``scale: true`` and ``zero_point: true``. ``meta`` is free JSON (the exporter writes the
  backend, the source file and the model spec).
- ``mask``: ``np.packbits`` of the sparse tensors' non-zero masks (C order), concatenated.
- ``packed``: uint8, the fixed-point tensors' codes (the non-zero ones where sparse), each
  tensor ``bitpack.pack``-ed and padded to a whole byte.
- one pool per numpy dtype named by it (``float32``, ``float16``, ``int8``, ``int32``, ...):
  per tensor in index order its values or codes (non-zero ones only where sparse; none for a
  fixed-point tensor), then its scales (float32 pool), then its zero points (in the codes'
  dtype).

A reader walks the index with one cursor per array: a sparse tensor's mask segment is its size
in bits, its value count that segment's set bits; a scale or zero point has ``shape[axis]``
entries, or one. A few arrays in all rather than a few per tensor keeps the archive's per-array
headers (~250 bytes each) from hiding, on small models, what the zeros save. At sparsity s a
sparse tensor of width w costs about ``(1/w + (1 - s))`` of its dense bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shrinkflow import bitpack
from shrinkflow.errors import ShrinkflowError

FORMAT = "shrinkflow.sparse/1"
GZIP_LEVEL = 9  # as metrics.gzip_bytes: the ``gzip -9`` figure the studies report
SCALE_DTYPE = np.dtype(np.float32)  # every scale, whatever the source stored (TFLite: float32)


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare fields
class StoredTensor:
    """One tensor as an artefact stores it.

    ``values`` are float values, integer codes (with ``scale``, and for int8-style codes a
    ``zero_point``) or ``bits``-bit fixed-point codes (int32, with ``scale``); ``scale`` and
    ``zero_point`` are scalars or one entry per channel along ``axis``.
    """

    values: np.ndarray
    sparse: bool = False
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    axis: int | None = None
    bits: int | None = None  # fixed-point width; None: the dtype's own

    def __post_init__(self) -> None:
        values = np.asarray(self.values)
        if self.bits is not None and (self.scale is None or self.zero_point is not None):
            raise ValueError("fixed-point codes take a scale and no zero point")
        if self.bits is not None:
            limit = bitpack.code_limit(self.bits)
            if values.size and np.abs(values).max() > limit:
                raise ValueError(f"{self.bits}-bit codes lie in [-{limit}, {limit}]")
            values = values.astype(np.int32)
        object.__setattr__(self, "values", values)
        for name, dtype in (("scale", SCALE_DTYPE), ("zero_point", values.dtype)):
            extra = getattr(self, name)
            if extra is None:
                continue
            if name == "zero_point" and self.scale is None:
                raise ValueError("a zero point needs a scale")
            cast = np.asarray(extra).astype(dtype).reshape(-1)
            if not np.array_equal(cast, np.asarray(extra).reshape(-1)):
                raise ValueError(f"{name} does not fit {dtype.name}")
            expected = 1 if self.axis is None else values.shape[self.axis]
            if cast.size != expected:
                raise ValueError(f"{cast.size} {name} entries for {expected} channel(s)")
            object.__setattr__(self, name, cast)

    @property
    def width(self) -> int:
        """Bits per stored code or value: ``bits`` for fixed-point, else the dtype's."""
        return self.bits if self.bits is not None else self.values.dtype.itemsize * 8

    def zero_code(self) -> np.ndarray | int:
        """The code(s) that stand for 0.0, broadcastable to ``values``: the zero point(s)."""
        if self.zero_point is None:
            return 0
        return self.zero_point.reshape(_channel_shape(self.values.ndim, self.axis))

    def nonzero(self) -> np.ndarray:
        """Where the tensor holds a value other than 0 (its codes other than the zero code)."""
        return self.values != self.zero_code()

    def dequantize(self) -> np.ndarray:
        """The float32 values the codes stand for (floats and raw arrays as they are)."""
        if self.scale is None:
            return self.values
        shape = _channel_shape(self.values.ndim, self.axis)
        codes = self.values.astype(np.float32) - np.asarray(self.zero_code(), np.float32)
        return codes * self.scale.reshape(shape)


def _channel_shape(ndim: int, axis: int | None) -> tuple[int, ...]:
    """The shape that broadcasts one entry per channel of ``axis`` (or one in all)."""
    shape = [1] * ndim
    if axis is not None:
        shape[axis] = -1
    return tuple(shape)


def is_weight(array: np.ndarray, quantized: bool = False) -> bool:
    """Whether an array is stored sparse by default: a kernel (two or more dimensions, the
    tensors pruning zeroes) of float values or, ``quantized``, of integer codes. Vectors
    (biases, BatchNorm) stay dense, and so do integer arrays that are not codes (shapes,
    paddings, counters)."""
    array = np.asarray(array)
    kinds = "fiu" if quantized else "f"
    return array.ndim >= 2 and array.dtype.kind in kinds


def arrays(tensors: Mapping[str, StoredTensor], meta: Mapping[str, Any] | None = None) -> dict:
    """The archive's arrays for ``tensors`` (see the module docstring)."""
    index, masks, packed = [], [], []
    pools: dict[str, list[np.ndarray]] = {}

    def pool(array: np.ndarray) -> None:
        pools.setdefault(array.dtype.name, []).append(array.reshape(-1))

    for key, tensor in tensors.items():
        values = tensor.values
        entry: dict[str, Any] = {"key": key, "shape": list(values.shape)}
        entry.update(dtype=values.dtype.name, sparse=bool(tensor.sparse))
        kept = values.reshape(-1)
        if tensor.sparse:
            nonzero = tensor.nonzero().reshape(-1)
            masks.append(nonzero)
            kept = kept[nonzero]
        if tensor.bits is not None:
            entry["bits"] = tensor.bits
            packed.append(bitpack.pack(kept, tensor.bits))
        else:
            pool(kept)
        if tensor.axis is not None:
            entry["axis"] = tensor.axis
        for name in ("scale", "zero_point"):
            if getattr(tensor, name) is not None:
                entry[name] = True
                pool(getattr(tensor, name))
        index.append(entry)
    document = {"format": FORMAT, "meta": dict(meta or {}), "tensors": index}
    out = {
        "index": np.frombuffer(json.dumps(document, separators=(",", ":")).encode(), np.uint8),
        "mask": np.packbits(np.concatenate(masks) if masks else np.zeros(0, bool)),
        "packed": np.concatenate(packed) if packed else np.zeros(0, np.uint8),
    }
    out.update({name: np.concatenate(parts) for name, parts in pools.items()})
    return out


def encode(tensors: Mapping[str, StoredTensor], meta: Mapping[str, Any] | None = None) -> bytes:
    """The archive of ``tensors`` (with ``meta`` in its index) as bytes."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays(tensors, meta))
    return buffer.getvalue()


def save(path: Path, tensors: Mapping[str, StoredTensor], meta: Mapping | None = None) -> Path:
    """Write the archive of ``tensors`` to ``path`` (as is: callers wanting an atomic write
    pass a temporary path, see ``outputs.atomic_file``)."""
    Path(path).write_bytes(encode(tensors, meta))
    return Path(path)


def sizes(tensors: Mapping[str, StoredTensor]) -> tuple[int, int]:
    """``(sparse_bytes, sparse_gzip_bytes)``: the archive's bytes, plain and after gzip -9."""
    archive = encode(tensors)
    return len(archive), len(gzip.compress(archive, GZIP_LEVEL, mtime=0))


def figures(tensors: Mapping[str, StoredTensor]) -> dict[str, int]:
    """``nominal_bytes``, ``sparse_bytes`` and ``sparse_gzip_bytes`` of ``tensors``: the keys
    ``evaluate`` reports for every artefact (each backend's ``stored_weights`` reads them)."""
    sparse, sparse_gzip = sizes(tensors)
    return {
        "nominal_bytes": nominal_bytes(tensors),
        "sparse_bytes": sparse,
        "sparse_gzip_bytes": sparse_gzip,
    }


def nominal_bytes(tensors: Mapping[str, StoredTensor]) -> int:
    """What the non-zero values cost at their stored width, with nothing for where they are.

    Sum over tensors of (non-zero codes x ``width``) plus each scale (32 bits) and zero point
    (the codes' width), in bytes: no mask, index, padding or archive headers. Dense tensors
    count their non-zero entries too, so the figure depends only on the values and widths.
    The total is rounded up to whole bytes (a fixed-point width can leave part of one).
    """
    bits = 0
    for tensor in tensors.values():
        bits += int(np.count_nonzero(tensor.nonzero())) * tensor.width
        if tensor.scale is not None:
            bits += tensor.scale.size * SCALE_DTYPE.itemsize * 8
        if tensor.zero_point is not None:
            bits += tensor.zero_point.size * tensor.values.dtype.itemsize * 8
    return -(-bits // 8)


class _Cursor:
    """Reads consecutive segments of one archive array."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.at = array.reshape(-1), 0

    def take(self, count: int) -> np.ndarray:
        if self.at + count > self.array.size:
            raise ValueError(f"{self.array.dtype.name} data ends early")
        part = self.array[self.at : self.at + count]
        self.at += count
        return part


def decode(data: Mapping[str, np.ndarray]) -> tuple[dict[str, StoredTensor], dict[str, Any]]:
    """``(tensors, meta)`` from an archive's arrays; ValueError (or KeyError, TypeError) for
    arrays that do not describe them."""
    document = json.loads(bytes(np.asarray(data["index"], np.uint8)).decode())
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"no {FORMAT} index")
    bits_of_mask = np.unpackbits(np.asarray(data["mask"], np.uint8)).astype(bool)
    mask, packed = _Cursor(bits_of_mask), _Cursor(np.asarray(data["packed"], np.uint8))
    cursors: dict[str, _Cursor] = {}

    def take(dtype: np.dtype, count: int) -> np.ndarray:
        if dtype.name not in cursors:
            cursors[dtype.name] = _Cursor(np.asarray(data[dtype.name]))
        part = cursors[dtype.name].take(count)
        if part.dtype != dtype:
            raise ValueError(f"pool {dtype.name} holds {part.dtype.name}")
        return part

    tensors = {}
    for entry in document["tensors"]:
        shape = tuple(int(n) for n in entry["shape"])
        dtype, size = np.dtype(entry["dtype"]), int(np.prod(shape))
        if dtype.kind not in "biuf":
            raise ValueError(f"{entry['key']}: dtype {dtype.name} is not numeric")
        bits, axis = entry.get("bits"), entry.get("axis")
        # Every count is checked against the data before anything of that size is allocated.
        nonzero = mask.take(size) if entry["sparse"] else None
        count = size if nonzero is None else int(nonzero.sum())
        if bits is not None:
            kept = bitpack.unpack(packed.take(-(-count * bits // 8)), bits, (count,))
        else:
            kept = take(dtype, count)
        channels = 1 if axis is None else shape[axis]
        scale = take(SCALE_DTYPE, channels).copy() if entry.get("scale") else None
        zero_point = take(dtype, channels).copy() if entry.get("zero_point") else None
        if nonzero is None:
            values = kept.copy()
        else:
            values = np.zeros(size, dtype)
            if zero_point is not None:
                channel = zero_point.reshape(_channel_shape(len(shape), axis))
                values = np.broadcast_to(channel, shape).reshape(-1).copy()
            values[nonzero] = kept
        tensors[entry["key"]] = StoredTensor(
            values.reshape(shape), bool(entry["sparse"]), scale, zero_point, axis, bits
        )
    # The mask is padded to a whole byte; every other array must be read to its end.
    ends = {"mask": mask.array.size - mask.at >= 8, "packed": packed.at < packed.array.size}
    ends.update({name: c.at < c.array.size for name, c in cursors.items()})
    ends.update({name: True for name in set(data) - {"index", *ends}})
    left = sorted(name for name, over in ends.items() if over)
    if left:
        raise ValueError(f"data left over in {left[0]!r}")
    return tensors, document.get("meta") or {}


def read(path: Path) -> tuple[dict[str, StoredTensor], dict[str, Any]]:
    """``(tensors, meta)`` of the archive at ``path``; a one-line ShrinkflowError naming it
    for anything that is not one. Never unpickles: ``np.load(allow_pickle=False)``."""
    path = Path(path)
    if not path.is_file():
        raise ShrinkflowError(f"{path}: no such file")
    try:
        if not zipfile.is_zipfile(path):  # np.load would read a lone .npy array, or a pickle
            raise ValueError("not an .npz archive")
        with np.load(path, allow_pickle=False) as archive:
            data = {name: archive[name] for name in archive.files}
        return decode(data)
    except (OSError, ValueError, LookupError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShrinkflowError(f"{path}: not a readable {FORMAT} file ({reason})") from None


def load(path: Path) -> dict[str, StoredTensor]:
    """The tensors of the archive at ``path``, codes exactly as stored (``dequantize()`` each
    for float values); a one-line ShrinkflowError naming ``path`` for anything else."""
    return read(path)[0]
