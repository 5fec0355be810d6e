"""Tests for shrinkflow.measure: the timing and memory protocol both backends' evaluate share."""

import time

import numpy as np
import pytest

from shrinkflow import measure


def test_time_calls_counts_warmup_and_repeats():
    calls, syncs = [], []
    seconds = measure.time_calls(
        lambda: calls.append(1), warmup=3, repeats=7, sync=lambda: syncs.append(1)
    )
    assert len(seconds) == 7
    assert len(calls) == len(syncs) == 10
    assert all(s >= 0 for s in seconds)


def test_time_interleaved_takes_turns_call_by_call():
    calls = []
    seconds = measure.time_interleaved(
        [lambda: calls.append("a"), lambda: calls.append("b")], warmup=1, repeats=3
    )
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up per function, then alternating
    assert [len(s) for s in seconds] == [3, 3]


def test_a_spent_budget_ends_warmup_and_timing_early_but_not_before_the_minimum():
    calls = []

    def slow(name: str):
        return lambda: calls.append(name) or time.sleep(0.02)

    budget = measure.Budget(seconds=0.1, min_repeats=3)
    seconds = measure.time_interleaved([slow("a"), slow("b")], 10, 30, budget=budget)
    # a round takes 40 ms: warm-up ends after its first round at 25 ms; timing at 3 rounds
    # (120 ms, past the budget), when the minimum is reached
    assert calls[:2] == ["a", "b"] and calls.count("a") == calls.count("b") == 1 + 3
    assert [len(s) for s in seconds] == [3, 3]
    fast = measure.time_interleaved([lambda: None], 10, 30, budget=budget)
    assert len(fast[0]) == 30  # within its budget, every repeat


def test_time_calls_measures_the_call():
    seconds = measure.time_calls(lambda: time.sleep(0.01), warmup=0, repeats=3)
    assert all(0.009 <= s < 1.0 for s in seconds)


def test_time_calls_includes_sync_in_the_timing():
    seconds = measure.time_calls(lambda: None, warmup=0, repeats=2, sync=lambda: time.sleep(0.01))
    assert all(s >= 0.009 for s in seconds)


def test_latency_stats_from_seconds():
    stats = measure.LatencyStats.from_seconds([0.004, 0.001, 0.003, 0.002, 0.010])
    assert stats.median_ms == pytest.approx(3.0)
    assert stats.min_ms == pytest.approx(1.0)
    # numpy's linear interpolation: rank 0.9 * 4 = 3.6 between 4 ms and 10 ms.
    assert stats.p90_ms == pytest.approx(4.0 + 0.6 * 6.0)
    with pytest.raises(ValueError):
        measure.LatencyStats.from_seconds([])


def test_peak_memory_sees_a_200_mb_array():
    with measure.PeakMemory() as peak:
        block = np.ones(200 * 2**20, dtype=np.uint8)  # ones, not zeros: every page is touched
        del block
    assert peak.method in ("vmhwm", "ru_maxrss")
    if peak.method == "ru_maxrss":
        pytest.skip("clear_refs not writable: ru_maxrss only sees new lifetime peaks")
    assert peak.peak_mb >= 190


def test_peak_memory_of_a_no_op_block_is_near_zero():
    with measure.PeakMemory() as peak:
        pass
    assert 0 <= peak.peak_mb < 5


SETTINGS = {"batch_sizes": [1, 4], "warmup": 2, "repeats": 3}


def test_measure_speeds_times_latency_and_throughput_batches_taking_turns():
    events = []

    def call_at(name):
        def at(batch):
            events.append(("prepare", name, batch))
            return lambda: events.append(("call", name, batch))

        return at

    speeds = measure.measure_speeds([call_at("model"), call_at("reference")], SETTINGS)
    assert len(speeds) == 2
    prepared = [e for e in events if e[0] == "prepare"]
    assert prepared == [
        ("prepare", "model", 1), ("prepare", "reference", 1),
        ("prepare", "model", 4), ("prepare", "reference", 4),
    ]  # fmt: skip
    for batch in (1, 4):
        calls = [e[1] for e in events if e[0] == "call" and e[2] == batch]
        assert calls == ["model", "reference"] * (2 + 3)  # warm-up and timing call by call
    assert all(speed.throughput_ips > 0 for speed in speeds)


def test_measure_speeds_times_one_batch_once_when_both_are_the_same():
    prepared = []
    settings = {"batch_sizes": [1], "warmup": 0, "repeats": 2}
    (speed,) = measure.measure_speeds([lambda b: prepared.append(b) or (lambda: None)], settings)
    assert prepared == [1]
    assert speed.throughput_ips == pytest.approx(1 / (speed.latency.median_ms / 1e3))


def test_latency_is_timed_at_batch_1_whatever_the_batch_sizes():
    timed = []

    def call_at(batch):
        return lambda: timed.append(batch)

    settings = {"batch_sizes": [8, 64], "warmup": 1, "repeats": 2}
    (speed,) = measure.measure_speeds([call_at], settings)
    assert timed == [1] * 3 + [64] * 3  # neither 8 nor the first entry: batch 1, then the largest
    figures = measure.speed_figures(speed, settings)
    assert figures["latency_batch"] == 1 and figures["throughput_batch"] == 64


def test_measure_speeds_syncs_and_times_inside_the_context():
    inside, log = [], []

    class Context:
        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.append(False)

    def call():
        log.append(("call", inside[-1]))

    measure.measure_speeds(
        [lambda b: call], SETTINGS, sync=lambda: log.append(("sync", inside[-1])), context=Context
    )
    assert log == [("call", True), ("sync", True)] * (2 * (2 + 3))


def test_speed_figures_name_the_batches_timed():
    speed = measure.Speed(measure.LatencyStats(2.0, 3.0, 1.0), 500.0, 30, 12)
    assert measure.speed_figures(speed, {"batch_sizes": [4, 32, 8]}) == {
        "latency_ms_b1": 2.0,
        "latency_ms_b1_p90": 3.0,
        "latency_batch": 1,
        "throughput_ips": 500.0,
        "throughput_batch": 32,
        "latency_calls": 30,
        "throughput_calls": 12,
    }


def test_peak_memory_uses_a_device_probe_where_given():
    allocated = [10 * 2**20]
    peak = [0]

    def reset():
        peak[0] = allocated[0]
        return allocated[0]

    def forward():
        peak[0] = allocated[0] + 3 * 2**20  # a 3 MiB workspace, freed again

    probe = measure.DevicePeak("test_peak", reset, lambda: peak[0])
    assert measure.peak_memory(forward, probe) == (3.0, "test_peak")
    host_mb, method = measure.peak_memory(lambda: None)
    assert method in ("vmhwm", "ru_maxrss") and 0 <= host_mb < 5
