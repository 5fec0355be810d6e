"""Backend-neutral measurements of a model: file sizes, gzip sizes, accuracy, and its sizes and
speeds against a reference model (timing and memory: ``shrinkflow.measure``).

Nothing here imports a framework, so the torch and TensorFlow backends report numbers that
were measured the same way and can sit side by side in ``results/summary.csv``.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from shrinkflow import measure
    from shrinkflow.data.prepared import PreparedData

# The columns of results/summary.csv (DESIGN.md section 5), in order. One row per evaluated
# artefact and training seed (`seed`: the seeds entry it was trained with; the split's seed is
# params' `seed` and the same for every row). `val_top1` decides (budget, Pareto front,
# champion), `top1` is the test accuracy reported beside it; `val_images`/`test_images` are
# the split sizes the binomial intervals need. Sizes: `size_bytes` is the file as deployed,
# `gzip_bytes` that file gzipped, `nominal_bytes` the nonzero weights x their bits / 8,
# `sparse_bytes`/`sparse_gzip_bytes` the weights in shrinkflow's sparse encoding at their
# stored precision (shrinkflow.sparse_format). Speed: `runtime` is what ran the artefact
# (torch, keras, tflite); `float_latency_ms_b1` is the float model of the same runtime, timed
# side by side (a quantized/converted artefact's source, converted to that runtime's float
# form where needed), and `speedup_b1` = float_latency_ms_b1 / latency_ms_b1; both are empty
# for float models, whose speed-up the report takes against the baseline. `pruned_val_top1` is
# the validation top-1 of the chain's pruned model right after pruning, before fine-tuning (set
# on fine-tuned points and what was quantized from them). `experiment_id` is the MLflow
# experiment of `run_id` (the evaluate run), so the report can link the run's page.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "backend",
    "model",
    "seed",
    "stage",
    "prune_method",
    "target_sparsity",
    "measured_sparsity",
    "quant_method",
    "top1",
    "val_top1",
    "pruned_val_top1",
    "top5",
    "test_images",
    "val_images",
    "params",
    "nonzero_params",
    "macs",
    "size_bytes",
    "gzip_bytes",
    "nominal_bytes",
    "sparse_bytes",
    "sparse_gzip_bytes",
    "latency_ms_b1",
    "throughput_ips",
    "runtime",
    "float_latency_ms_b1",
    "speedup_b1",
    "peak_mem_mb",
    "run_id",
    "experiment_id",
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
    result: dict,
    reference_file: Path,
    speed: measure.Speed,
    reference_runtime: str,
    float_speed: measure.Speed,
) -> dict[str, float | str]:
    """The keys evaluate adds with ``--reference`` (the float model a quantized or converted
    artefact came from), from ``result`` (the artefact's own figures, ``runtime`` included)
    and speeds timed side by side with the artefact's (``measure.measure_speeds``).

    Two comparisons, told apart by their names:

    - against the reference file as it runs (``speed``, in ``reference_runtime``):
      ``reference_*``, ``size_ratio``, ``gzip_ratio``, ``latency_speedup`` and
      ``throughput_speedup``. Where ``reference_runtime`` differs from ``result["runtime"]``
      (a TFLite file against its Keras model) the speed ratios are cross-runtime: they
      include what one runtime costs per call over the other, not only what quantization buys;
    - against the float model in the artefact's own runtime (``float_speed``: the reference
      itself where its runtime is the artefact's, else its conversion to that runtime's float
      form): ``float_latency_ms_b1``, ``float_throughput_ips``, ``speedup_b1`` (float latency
      over the artefact's) and ``throughput_speedup_same_runtime``, like with like.
    """
    size, gzip_size = file_bytes(reference_file), gzip_bytes(reference_file)
    return {
        "reference_size_bytes": size,
        "reference_gzip_bytes": gzip_size,
        "reference_runtime": reference_runtime,
        "reference_latency_ms_b1": speed.latency.median_ms,
        "reference_throughput_ips": speed.throughput_ips,
        "size_ratio": result["size_bytes"] / size,
        "gzip_ratio": result["gzip_bytes"] / gzip_size,
        "latency_speedup": speed.latency.median_ms / result["latency_ms_b1"],
        "throughput_speedup": result["throughput_ips"] / speed.throughput_ips,
        "float_latency_ms_b1": float_speed.latency.median_ms,
        "float_throughput_ips": float_speed.throughput_ips,
        "speedup_b1": float_speed.latency.median_ms / result["latency_ms_b1"],
        "throughput_speedup_same_runtime": result["throughput_ips"] / float_speed.throughput_ips,
    }


def accuracy_figures(
    test: Mapping[int, float], val: Mapping[int, float], data: PreparedData
) -> dict[str, float | int]:
    """The accuracy keys evaluate reports from ``topk_accuracy`` of the test and validation
    splits of ``data`` (a ``PreparedData``): top-1 and top-5 on test, top-1 on validation, and
    the two split sizes, which the report's binomial intervals need."""
    return {
        "top1": test[1],
        "top5": test[5],
        "val_top1": val[1],
        "test_images": len(data.test),
        "val_images": len(data.val),
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
