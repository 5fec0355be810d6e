"""Backend-neutral measurements of a model: file sizes, gzip sizes, accuracy, and its sizes and
speeds against a reference model (timing and memory: ``shrinkflow.measure``).

Nothing here imports a framework, so the torch and TensorFlow backends report numbers that
were measured the same way and can sit side by side in ``results/summary.csv``.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from shrinkflow import measure

# The columns of results/summary.csv (DESIGN.md section 5), in order.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "backend",
    "model",
    "stage",
    "prune_method",
    "target_sparsity",
    "measured_sparsity",
    "quant_method",
    "top1",
    "top5",
    "params",
    "nonzero_params",
    "macs",
    "size_bytes",
    "gzip_bytes",
    "latency_ms_b1",
    "throughput_ips",
    "peak_mem_mb",
    "run_id",
    "artifact",
)

_CHUNK = 1 << 20  # stream files in 1 MiB pieces: a ResNet-50 checkpoint never sits in memory twice


def _files(path: Path) -> list[Path]:
    """The regular files under ``path`` (or ``path`` itself), sorted for a stable order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return sorted(p for p in path.rglob("*") if p.is_file())


def file_bytes(path: Path) -> int:
    """Size in bytes of a file, or the sum over the files of a folder (a SavedModel)."""
    return sum(p.stat().st_size for p in _files(Path(path)))


class _CountingSink(io.RawIOBase):
    """A write-only stream that keeps only the number of bytes written to it."""

    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.count += len(data)
        return len(data)


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Owner, group and times vary between machines and checkouts but not between artefacts.
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def gzip_bytes(path: Path, level: int = 9) -> int:
    """Bytes of ``path`` after gzip at ``level`` (9: the ``gzip -9`` figure the studies report).

    The stream is byte-identical to ``gzip.compress(data, level, mtime=0)`` but is counted
    rather than kept. A folder is first packed into a deterministic tar (sorted members,
    zeroed times and owners), so the figure depends only on the folder's content.
    """
    path = Path(path)
    sink = _CountingSink()
    with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=level, mtime=0) as gz:
        if path.is_dir():
            with tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar:
                for member in _files(path):
                    tar.add(
                        member,
                        arcname=member.relative_to(path).as_posix(),
                        recursive=False,
                        filter=_tar_filter,
                    )
        else:
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    gz.write(chunk)
    return sink.count


def reference_comparison(
    result: dict, reference_file: Path, speed: measure.Speed
) -> dict[str, float]:
    """The reference model's size and speed (``speed`` timed alongside the model's, see
    ``measure.measure_speeds``) and ``result``'s ratios to them: the keys evaluate adds with
    ``--reference``."""
    size, gzip_size = file_bytes(reference_file), gzip_bytes(reference_file)
    return {
        "reference_size_bytes": size,
        "reference_gzip_bytes": gzip_size,
        "reference_latency_ms_b1": speed.latency.median_ms,
        "reference_throughput_ips": speed.throughput_ips,
        "size_ratio": result["size_bytes"] / size,
        "gzip_ratio": result["gzip_bytes"] / gzip_size,
        "latency_speedup": speed.latency.median_ms / result["latency_ms_b1"],
        "throughput_speedup": result["throughput_ips"] / speed.throughput_ips,
    }


def topk_accuracy(
    logits: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (1, 5)
) -> dict[int, float]:
    """Share of rows whose label is among the ``k`` highest scores, for each ``k`` in ``ks``.

    ``k`` is capped at the number of classes (top-5 of a 3-class problem is top-3, i.e. 1.0).
    Ties are broken by class index, lowest first, so the result is deterministic.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"topk_accuracy needs logits (N, C) and labels (N,), got {logits.shape} "
            f"and {labels.shape}"
        )
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one sample")
    num_classes = logits.shape[1]
    ks = tuple(ks)
    # A stable sort of the negated scores ranks ties by class index.
    ranked = np.argsort(-logits, axis=1, kind="stable")[:, : min(max(ks), num_classes)]
    hits = ranked == labels[:, None]
    return {k: float(hits[:, : min(k, num_classes)].any(axis=1).mean()) for k in ks}
