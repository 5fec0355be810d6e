"""How evaluation times a model and probes its memory: one protocol for both backends.

A backend supplies only what is its own: for each model, a callable that prepares one timed
call at a batch size (``CallAt``: load or lower the model for that size, place its input), the
``sync`` of an asynchronous device, the context the calls run in (torch's ``no_grad``), and a
probe of its device allocator (``DevicePeak``). The protocol is the same for both:

- ``measure_speeds``: latency at batch 1 (``LATENCY_BATCH``, median of ``repeats`` calls)
  and throughput at the largest of ``batch_sizes``, each after ``warmup`` untimed calls; a
  model and the models it is compared with take turns call by call (``time_interleaved``), so
  their ratios hold on a busy machine;
- ``peak_memory``: what one call adds on top of the loaded model and its input, on the host
  (``PeakMemory``) or on a device (``DevicePeak``).

Nothing here imports a framework.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

Call = Callable[[], object]  # one timed call: a forward pass on an input already in place
CallAt = Callable[[int], Call]  # batch size -> the timed call for that size

# Latency is the time of one image alone (``latency_ms_b1``), whatever ``batch_sizes`` holds:
# a latency at another batch size would not compare across configurations.
LATENCY_BATCH = 1


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
    budget: Budget | None = None,
) -> list[list[float]]:
    """``time_calls`` for several functions at once, taking turns call by call (warm-up too).

    A burst of load from elsewhere then slows every function alike instead of one of them,
    so their ratio (a speed-up) holds even on a busy machine. With a ``budget``, warm-up and
    timing end early once it is spent (``Budget``); every function gets as many calls.
    """
    budget = budget or Budget()
    started = time.perf_counter()
    for done in range(warmup):
        if done and budget.warmup_spent(time.perf_counter() - started):
            break
        for fn in fns:
            fn()
            if sync is not None:
                sync()
    seconds: list[list[float]] = [[] for _ in fns]
    started = time.perf_counter()
    for done in range(repeats):
        if budget.timing_spent(done, time.perf_counter() - started):
            break
        for fn, times in zip(fns, seconds, strict=True):
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times.append(time.perf_counter() - start)
    return seconds


@dataclass(frozen=True)
class Budget:
    """How long one batch size's timing may take (``evaluate.max_seconds``): timed rounds (a
    call of each model) stop once ``seconds`` have passed, never before ``min_repeats`` rounds
    (or ``repeats``, if fewer); warm-up stops after a quarter of it, never before one round.
    A model of 1 s per call at the throughput batch then costs seconds, not a minute; a fast
    one still gets all its ``repeats``. Unbounded by default."""

    seconds: float = math.inf
    min_repeats: int = 5

    def warmup_spent(self, elapsed: float) -> bool:
        return elapsed >= self.seconds / 4

    def timing_spent(self, rounds: int, elapsed: float) -> bool:
        return rounds >= self.min_repeats and elapsed >= self.seconds


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


@dataclass(frozen=True)
class Speed:
    """How fast one model ran: latency at batch 1, throughput at the largest batch size."""

    latency: LatencyStats
    throughput_ips: float  # images per second at the throughput batch
    latency_calls: int  # timed calls behind each median (fewer than repeats: the budget ended)
    throughput_calls: int


def measure_speeds(
    calls_at: Sequence[CallAt],
    settings: Mapping,
    sync: Callable[[], None] | None = None,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> list[Speed]:
    """Median latency at batch 1 (``LATENCY_BATCH``) and throughput at the largest of
    ``settings["batch_sizes"]``, one ``Speed`` per model of ``calls_at``; the models take turns
    call by call.

    ``settings`` is ``cfg["evaluate"]`` (``batch_sizes``, ``warmup``, ``repeats``,
    ``max_seconds``: each batch size's ``Budget``). Each batch
    size's calls are prepared (``calls_at``, model by model) before any is timed, and timed
    inside ``context()``; ``sync`` runs after every call (``time_interleaved``).
    """
    latency_batch = LATENCY_BATCH
    throughput_batch = max(settings["batch_sizes"])
    budget = Budget(float(settings.get("max_seconds") or math.inf))

    def timings(batch: int) -> list[list[float]]:
        calls = [call_at(batch) for call_at in calls_at]
        with context():
            return time_interleaved(calls, settings["warmup"], settings["repeats"], sync, budget)

    latencies = timings(latency_batch)
    throughputs = latencies if throughput_batch == latency_batch else timings(throughput_batch)
    return [
        Speed(
            LatencyStats.from_seconds(latency),
            throughput_batch / LatencyStats.from_seconds(throughput).median_ms * 1e3,
            latency_calls=len(latency),
            throughput_calls=len(throughput),
        )
        for latency, throughput in zip(latencies, throughputs, strict=True)
    ]


def speed_figures(speed: Speed, settings: Mapping) -> dict[str, float | int]:
    """``evaluate``'s keys for the model's own ``speed``, with the batch sizes it was timed at."""
    return {
        "latency_ms_b1": speed.latency.median_ms,
        "latency_ms_b1_p90": speed.latency.p90_ms,
        "latency_batch": LATENCY_BATCH,
        "throughput_ips": speed.throughput_ips,
        "throughput_batch": max(settings["batch_sizes"]),
        "latency_calls": speed.latency_calls,
        "throughput_calls": speed.throughput_calls,
    }


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


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


class _Probe(ABC):
    """How far memory rises during a ``with`` block: ``peak_mb`` (MiB), measured as ``method``
    says; a subclass reads its counters on entry (``_begin``) and on exit (``_end``)."""

    method = ""

    def __init__(self) -> None:
        self.peak_mb = 0.0

    @abstractmethod
    def _begin(self) -> None:
        """Reset or read the counters before the block."""

    @abstractmethod
    def _end(self) -> float:
        """The rise in MiB since ``_begin``."""

    def __enter__(self) -> Self:
        self._begin()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.peak_mb = self._end()


class PeakMemory(_Probe):
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
        super().__init__()
        self._start_mb = 0.0

    def _begin(self) -> None:
        if _STATUS.exists() and _reset_high_water_mark():
            self.method = "vmhwm"
            self._start_mb = _status_kib("VmRSS") / 1024
        else:
            self.method = "ru_maxrss"
            self._start_mb = _maxrss_mib()

    def _end(self) -> float:
        end_mb = _status_kib("VmHWM") / 1024 if self.method == "vmhwm" else _maxrss_mib()
        # Pages released by other threads while the block runs can push VmRSS-on-entry above
        # the block's own peak; memory cannot be negative.
        return max(0.0, end_mb - self._start_mb)


class DevicePeak(_Probe):
    """Measure how far a device allocator's peak rises above its use on entry to a ``with``
    block, in MiB (``peak_mb``), as ``method`` names it.

    Args:
        method: the name reported with the figure (``cuda_max_allocated``, ``tf_gpu_peak``).
        reset: resets the allocator's peak statistic and returns the bytes in use.
        peak: the allocator's peak since the reset, in bytes.
    """

    def __init__(self, method: str, reset: Callable[[], int], peak: Callable[[], int]) -> None:
        super().__init__()
        self.method = method
        self._reset, self._peak = reset, peak
        self._start = 0

    def _begin(self) -> None:
        self._start = self._reset()

    def _end(self) -> float:
        return (self._peak() - self._start) / 2**20


def peak_memory(call: Call, probe: DevicePeak | None = None) -> tuple[float, str]:
    """Memory one ``call`` adds on top of what is allocated before it, in MiB, and how it was
    measured: by ``probe`` (a device's allocator), else on the host (``PeakMemory``).

    Measure first: earlier passes leave freed blocks in the allocators' pools, which a later
    pass reuses without raising the resident size, so it would seem to need nothing.
    """
    meter = PeakMemory() if probe is None else probe
    with meter:
        call()
    return meter.peak_mb, meter.method
