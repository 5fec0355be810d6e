"""Backend-neutral measurements: file sizes, gzip sizes, latency, peak memory and accuracy.

Nothing here imports a framework, so the torch and TensorFlow backends report numbers that
were measured the same way and can sit side by side in ``results/summary.csv``.
"""

from __future__ import annotations

import gzip
import io
import resource
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

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


def time_calls(
    fn: Callable[[], object],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls.

    ``sync`` runs after every call inside the timed interval: asynchronous devices (CUDA)
    return before the work is done, so without it only the launch would be timed.
    """
    return time_interleaved([fn], warmup, repeats, sync)[0]


def time_interleaved(
    fns: list[Callable[[], object]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
) -> list[list[float]]:
    """``time_calls`` for several functions at once, taking turns call by call.

    A burst of load from elsewhere then slows every function alike instead of one of them,
    so their ratio (a speed-up) holds even on a busy machine.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
            if sync is not None:
                sync()
    seconds: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, seconds, strict=True):
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times.append(time.perf_counter() - start)
    return seconds


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-call times in milliseconds; the median resists scheduler outliers."""

    median_ms: float
    p90_ms: float
    min_ms: float

    @classmethod
    def from_seconds(cls, seconds: Iterable[float]) -> LatencyStats:
        ms = np.asarray(list(seconds), dtype=np.float64) * 1e3
        if ms.size == 0:
            raise ValueError("LatencyStats needs at least one timing")
        return cls(
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            min_ms=float(ms.min()),
        )


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class Speed:
    """How fast one model ran: latency at the latency batch, throughput at the largest one."""

    latency: LatencyStats
    throughput_ips: float  # images per second at the throughput batch


def reference_comparison(result: dict, reference_file: Path, speed: Speed) -> dict[str, float]:
    """The reference model's size and speed (``speed`` timed alongside the model's, see
    ``time_interleaved``) and ``result``'s ratios to them: the keys evaluate adds with
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


def _status_kib(field: str) -> int:
    """A ``VmXXX:  1234 kB`` line of /proc/self/status, in KiB."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {field} line")


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _maxrss_mib() -> float:
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1 << 20) if sys.platform == "darwin" else maxrss / 1024


class PeakMemory:
    """Measure how far this process's peak resident memory rises during a ``with`` block.

    ``peak_mb`` is the increase in MiB; ``method`` says how it was measured:

    - ``"vmhwm"``: the kernel's high-water mark is reset on entry (``/proc/self/clear_refs``),
      and the peak inside the block (VmHWM) minus the resident size on entry (VmRSS) is
      reported. This sees memory that was allocated and freed again inside the block.
    - ``"ru_maxrss"``: where the reset is not possible (not Linux, or a locked-down /proc),
      the growth of the lifetime peak. It only sees the part of the block's peak that exceeds
      every earlier peak of the process, so it can under-report.
    """

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.method = ""
        self._start_mb = 0.0

    def __enter__(self) -> PeakMemory:
        if _STATUS.exists() and _reset_high_water_mark():
            self.method = "vmhwm"
            self._start_mb = _status_kib("VmRSS") / 1024
        else:
            self.method = "ru_maxrss"
            self._start_mb = _maxrss_mib()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        end_mb = _status_kib("VmHWM") / 1024 if self.method == "vmhwm" else _maxrss_mib()
        # Pages released by other threads while the block runs can push VmRSS-on-entry above
        # the block's own peak; memory cannot be negative.
        self.peak_mb = max(0.0, end_mb - self._start_mb)


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
