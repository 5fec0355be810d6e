"""Tests for the backend-neutral measurements in shrinkflow.metrics (timing and memory:
tests/test_measure.py)."""

import gzip
import os

import numpy as np
import pytest

from shrinkflow import metrics


def _write(path, data: bytes, mtime: float | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_summary_columns_follow_the_design():
    """DESIGN.md section 5's columns in their order, plus what issue 17 added: the seed, the
    validation accuracy and split sizes, the sparse-encoding sizes and the same-runtime speed."""
    design = (
        "backend", "model", "stage", "prune_method", "target_sparsity", "measured_sparsity",
        "quant_method", "top1", "top5", "params", "nonzero_params", "macs", "size_bytes",
        "gzip_bytes", "latency_ms_b1", "throughput_ips", "peak_mem_mb", "run_id", "artifact",
    )  # fmt: skip
    added = {
        "seed", "val_top1", "test_images", "val_images", "nominal_bytes", "sparse_bytes",
        "sparse_gzip_bytes", "runtime", "float_latency_ms_b1", "speedup_b1",
        "pruned_val_top1", "experiment_id",
    }  # fmt: skip
    assert [c for c in metrics.SUMMARY_COLUMNS if c not in added] == list(design)
    assert set(metrics.SUMMARY_COLUMNS) - set(design) == added


def test_gzip_bytes_of_a_file_matches_gzip_compress(tmp_path):
    data = np.random.default_rng(0).integers(0, 4, 300_000, dtype=np.uint8).tobytes()
    path = _write(tmp_path / "model.pt", data)
    assert metrics.gzip_bytes(path) == len(gzip.compress(data, compresslevel=9, mtime=0))
    assert metrics.gzip_bytes(path, level=1) == len(gzip.compress(data, compresslevel=1, mtime=0))


def test_gzip_bytes_separates_compressible_from_random_data(tmp_path):
    n = 200_000
    zeros = _write(tmp_path / "zeros.bin", bytes(n))
    noise = _write(tmp_path / "noise.bin", np.random.default_rng(0).bytes(n))
    assert metrics.gzip_bytes(zeros) < n // 100
    # Random bytes do not compress: gzip only adds its header, trailer and block overhead.
    assert n <= metrics.gzip_bytes(noise) < n * 1.01


def test_gzip_bytes_of_a_folder_ignores_mtimes(tmp_path):
    sizes = []
    for name, mtime in (("a", 1_000_000), ("b", 2_000_000_000)):
        folder = tmp_path / name
        _write(folder / "saved_model.pb", b"graph" * 1000, mtime)
        _write(folder / "variables" / "variables.data", b"\x01\x02" * 5000, mtime)
        os.utime(folder / "variables", (mtime, mtime))
        sizes.append(metrics.gzip_bytes(folder))
    assert sizes[0] == sizes[1]

    # ...but not the content.
    _write(tmp_path / "b" / "variables" / "variables.data", np.random.default_rng(0).bytes(10_000))
    assert metrics.gzip_bytes(tmp_path / "b") > sizes[0] + 5000


def test_file_bytes_of_a_file_and_a_folder(tmp_path):
    _write(tmp_path / "m" / "a.bin", b"x" * 10)
    _write(tmp_path / "m" / "sub" / "b.bin", b"y" * 32)
    assert metrics.file_bytes(tmp_path / "m" / "a.bin") == 10
    assert metrics.file_bytes(tmp_path / "m") == 42
    with pytest.raises(FileNotFoundError):
        metrics.file_bytes(tmp_path / "missing")


def test_topk_accuracy_hand_computed():
    logits = np.array(
        [
            [0.1, 0.5, 0.2, 0.9],  # ranking 3, 1, 2, 0
            [0.8, 0.1, 0.05, 0.05],  # ranking 0, 1, 2, 3 (tie broken by index)
            [0.2, 0.3, 0.4, 0.1],  # ranking 2, 1, 0, 3
            [0.3, 0.2, 0.1, 0.4],  # ranking 3, 0, 1, 2
        ]
    )
    labels = np.array([3, 2, 0, 1])
    acc = metrics.topk_accuracy(logits, labels, ks=(1, 2, 3))
    assert acc == {1: 0.25, 2: 0.25, 3: 1.0}


def test_topk_accuracy_caps_k_at_the_number_of_classes():
    logits = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    labels = np.array([0, 1])
    assert metrics.topk_accuracy(logits, labels) == {1: 0.0, 5: 1.0}


def test_topk_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        metrics.topk_accuracy(np.zeros((3, 4)), np.zeros(2, dtype=np.int64))
