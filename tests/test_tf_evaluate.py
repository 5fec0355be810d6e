"""Tests for the TensorFlow evaluation stage on Keras and TFLite nodes."""

from __future__ import annotations

import copy
import shutil
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tf_fixtures import TFLITE_CFG as CFG
from tf_fixtures import check_layer_sparsity, interpreter_top1, keras_top1, quantize

from shrinkflow import metrics
from shrinkflow.backends.base import JobContext
from shrinkflow.backends.tensorflow import evaluate, stored_weights, tflite
from shrinkflow.backends.tensorflow.artifact import (
    FIXED_FILE,
    KERAS_FILE,
    SPEC_FILE,
    TFLITE_FILE,
    load_model,
    save_model,
)
from shrinkflow.backends.tensorflow.quantize import quantize_model
from shrinkflow.backends.tensorflow.weights import count_params, prunable_layers, unwrap
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError

KEYS = {
    "top1",
    "top5",
    "val_top1",
    "params",
    "nonzero_params",
    "prunable_weights",
    "prunable_nonzero",
    "layer_sparsity",
    "measured_sparsity",
    "macs",
    "size_bytes",
    "gzip_bytes",
    "nominal_bytes",
    "sparse_bytes",
    "sparse_gzip_bytes",
    "latency_ms_b1",
    "latency_ms_b1_p90",
    "latency_batch",
    "throughput_ips",
    "throughput_batch",
    "latency_calls",
    "throughput_calls",
    "peak_mem_mb",
    "peak_mem_method",
    "threads",
    "device",
    "runtime",
    "test_images",
    "val_images",
}
REFERENCE_KEYS = {
    "reference_size_bytes",
    "reference_gzip_bytes",
    "reference_runtime",
    "reference_latency_ms_b1",
    "reference_throughput_ips",
    "size_ratio",
    "gzip_ratio",
    "latency_speedup",
    "throughput_speedup",
    "float_latency_ms_b1",
    "float_throughput_ips",
    "speedup_b1",
    "throughput_speedup_same_runtime",
}
QUICK = {**CFG, "evaluate": {"device": "cpu", "batch_sizes": [8], "warmup": 0, "repeats": 1}}


def _device_cfg(device: str) -> dict:
    cfg = copy.deepcopy(CFG)
    cfg["evaluate"]["device"] = device
    return cfg


@pytest.fixture(scope="module")
def nodes(tf_digits_baseline, tf_digits_conversions):
    """The trained float node, its static int8 TFLite file, the data and the Keras model (from
    conftest's session fixtures: read only)."""
    folder, data = tf_digits_baseline
    int8, _ = tf_digits_conversions["static_int8"]
    return folder, int8, data, load_model(folder)[0]


@pytest.fixture(scope="module")
def keras_result(nodes):
    folder, _, data, _ = nodes
    return evaluate.evaluate_model(CFG, folder, data)


@pytest.fixture(scope="module")
def tflite_timed(nodes):
    """The static int8 file evaluated against its Keras reference, with the TFLite files the
    evaluation ran (``(path, batch, file bytes)`` per runner built) and the conversions it
    made (``(method, file bytes)``)."""
    folder, int8, data, _ = nodes
    built, converted = [], []

    class Recording(tflite.Runner):
        def __init__(self, path, batch, threads):
            built.append((path, batch, path.read_bytes()))
            super().__init__(path, batch, threads)

    def recording_convert(model, method, calibration):
        converted.append((method, convert(model, method, calibration)))
        return converted[-1][1]

    convert = tflite.convert
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tflite, "Runner", Recording)
        patch.setattr(tflite, "convert", recording_convert)
        result = evaluate.evaluate_model(CFG, int8, data, reference_dir=folder)
    return result, built, converted


@pytest.fixture(scope="module")
def tflite_result(tflite_timed):
    return tflite_timed[0]


def _sane_speed_and_memory(result: dict) -> None:
    assert result["device"] == "cpu"
    assert result["threads"] == tflite.default_threads()
    assert result["latency_batch"] == 1 and result["throughput_batch"] == 16
    assert 0 < result["latency_ms_b1"] <= result["latency_ms_b1_p90"]
    assert result["throughput_ips"] > 0
    assert result["peak_mem_mb"] >= 0 and result["peak_mem_method"] in ("vmhwm", "ru_maxrss")


def test_a_keras_node_gets_every_key_with_sane_values(nodes, keras_result):
    assert set(keras_result) == KEYS
    assert KEYS & set(metrics.SUMMARY_COLUMNS) == {
        "top1",
        "val_top1",
        "top5",
        "test_images",
        "val_images",
        "runtime",
        "params",
        "nonzero_params",
        "measured_sparsity",
        "macs",
        "size_bytes",
        "gzip_bytes",
        "nominal_bytes",
        "sparse_bytes",
        "sparse_gzip_bytes",
        "latency_ms_b1",
        "throughput_ips",
        "peak_mem_mb",
    }
    _sane_speed_and_memory(keras_result)
    assert keras_result["runtime"] == "keras"
    data = nodes[2]
    assert (keras_result["test_images"], keras_result["val_images"]) == (360, 180)
    assert (len(data.test), len(data.val)) == (360, 180)
    file = nodes[0] / KERAS_FILE
    assert keras_result["size_bytes"] == file.stat().st_size
    assert keras_result["gzip_bytes"] == metrics.gzip_bytes(file)


def test_a_tflite_node_gets_every_key_and_the_reference_figures(nodes, tflite_result):
    folder, int8, _, _ = nodes
    assert set(tflite_result) == KEYS | REFERENCE_KEYS
    _sane_speed_and_memory(tflite_result)
    file, reference = int8 / TFLITE_FILE, folder / KERAS_FILE
    assert tflite_result["size_bytes"] == file.stat().st_size
    assert tflite_result["gzip_bytes"] == metrics.gzip_bytes(file)
    sizes = stored_weights.encoding_sizes(int8)  # the file's int8 kernels, sparse
    assert sizes == {k: tflite_result[k] for k in sizes}
    assert tflite_result["nominal_bytes"] < tflite_result["sparse_bytes"]
    assert tflite_result["reference_size_bytes"] == reference.stat().st_size
    assert tflite_result["reference_gzip_bytes"] == metrics.gzip_bytes(reference)
    assert tflite_result["size_ratio"] == pytest.approx(
        tflite_result["size_bytes"] / tflite_result["reference_size_bytes"]
    )
    assert tflite_result["size_ratio"] < 0.5  # int8 weights, no Keras zip and config
    assert tflite_result["latency_speedup"] == pytest.approx(
        tflite_result["reference_latency_ms_b1"] / tflite_result["latency_ms_b1"]
    )
    assert tflite_result["throughput_speedup"] == pytest.approx(
        tflite_result["throughput_ips"] / tflite_result["reference_throughput_ips"]
    )


def test_a_tflite_node_is_timed_against_a_tflite_float32_conversion(nodes, tflite_timed):
    """Like with like: besides its Keras reference (the cross-runtime latency_speedup), the
    int8 file is timed against the reference converted to TFLite float32, at batch 1 too."""
    _, int8, _, _ = nodes
    result, built, converted = tflite_timed
    assert result["runtime"] == "tflite" and result["reference_runtime"] == "keras"
    ((method, float32_bytes),) = converted
    assert method == "float32"
    others = [(path, batch, data) for path, batch, data in built if path != int8 / TFLITE_FILE]
    # The conversion's file, timed at batch 1 and at the throughput batch.
    assert sorted(batch for _, batch, _ in others) == [1, 16]
    assert all(data == float32_bytes for _, _, data in others)
    float32 = others[0][0]
    assert result["speedup_b1"] == pytest.approx(
        result["float_latency_ms_b1"] / result["latency_ms_b1"]
    )
    assert result["throughput_speedup_same_runtime"] == pytest.approx(
        result["throughput_ips"] / result["float_throughput_ips"]
    )
    assert not float32.exists()  # converted in a temporary folder, removed after timing


def test_accuracy_matches_an_independent_computation(nodes, keras_result, tflite_result):
    _, int8, data, model = nodes
    assert keras_result["top1"] == pytest.approx(keras_top1(model, data))
    assert keras_result["val_top1"] == pytest.approx(keras_top1(model, data, "val"))
    scores = model.predict(data.images[data.test].astype(np.float32), verbose=0)
    top5 = np.argsort(-scores, axis=1)[:, :5]
    assert keras_result["top5"] == pytest.approx(
        np.mean((top5 == data.labels[data.test, None]).any(axis=1))
    )
    assert keras_result["top1"] < keras_result["top5"] <= 1.0
    assert tflite_result["top1"] == pytest.approx(interpreter_top1(int8 / TFLITE_FILE, data))
    assert tflite_result["val_top1"] == pytest.approx(
        interpreter_top1(int8 / TFLITE_FILE, data, "val")
    )


def test_counts_and_macs_of_both_formats(nodes, keras_result, tflite_result):
    model = nodes[3]
    assert {k: keras_result[k] for k in count_params(model)} == count_params(model)
    assert keras_result["measured_sparsity"] == 0.0
    assert keras_result["macs"] == evaluate.count_macs(model) > 0
    assert tflite_result["macs"] == keras_result["macs"]
    assert tflite_result["prunable_weights"] == keras_result["prunable_weights"]
    # Batch norm is folded into the convolutions: one bias per channel replaces its scale and
    # shift (two trainable values per channel).
    channels = sum(
        layer.gamma.shape[0]
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert tflite_result["params"] == keras_result["params"] - channels


def test_layer_sparsity_of_both_formats(nodes, keras_result, tflite_result):
    model = nodes[3]
    check_layer_sparsity(keras_result, model)
    check_layer_sparsity(tflite_result, model)
    assert keras_result["layer_sparsity"][0]["layer"] == "conv1"
    assert keras_result["layer_sparsity"][-1]["layer"] == "fc"
    kernels = [unwrap(layer).kernel.numpy() for layer in prunable_layers(model)]
    assert [e["nonzero"] for e in keras_result["layer_sparsity"]] == [
        int(np.count_nonzero(k)) for k in kernels
    ]


def test_zeroed_kernels_are_counted_from_the_tflite_file(nodes, tmp_path):
    folder, _, data, _ = nodes
    model, spec = load_model(folder)
    for name in ("layer1_0_conv1", "layer3_2_conv2", "fc"):
        kernel = model.get_layer(name).kernel
        flat = kernel.numpy().reshape(-1)
        flat[: flat.size // 2] = 0
        kernel.assign(flat.reshape(kernel.shape))
    (tmp_path / "pruned").mkdir()
    save_model(model, spec, tmp_path / "pruned")
    expected = count_params(model)  # what evaluate reports for the Keras node
    assert expected["measured_sparsity"] > 0.07

    float32, _ = quantize("float32", tmp_path / "pruned", data, tmp_path)
    counted = evaluate.evaluate_model(QUICK, float32, data)
    assert counted["prunable_nonzero"] == expected["prunable_nonzero"]
    assert counted["layer_sparsity"] == expected["layer_sparsity"]
    assert counted["measured_sparsity"] == pytest.approx(expected["measured_sparsity"])

    # int8 keeps every zero (symmetric weights) and rounds a few tiny weights to zero too.
    int8, _ = quantize("static_int8", tmp_path / "pruned", data, tmp_path)
    counted = evaluate.evaluate_model(QUICK, int8, data)
    assert counted["prunable_weights"] == expected["prunable_weights"]
    assert (
        expected["measured_sparsity"]
        <= counted["measured_sparsity"]
        <= expected["measured_sparsity"] + 0.02
    )
    check_layer_sparsity(counted, model)
    for got, kept in zip(counted["layer_sparsity"], expected["layer_sparsity"], strict=True):
        assert got["nonzero"] <= kept["nonzero"], got["layer"]


def test_one_interpreter_per_batch_size(nodes, monkeypatch):
    _, int8, data, _ = nodes
    built = Counter()

    class Counting(tflite.Runner):
        def __init__(self, path, batch, threads):
            built[batch] += 1
            super().__init__(path, batch, threads)

    monkeypatch.setattr(tflite, "Runner", Counting)
    evaluate.evaluate_model(CFG, int8, data)
    assert built == {1: 1, 16: 1}


def test_cuda_for_a_tflite_file_is_refused(nodes, monkeypatch):
    _, int8, data, _ = nodes
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["a GPU"])
    with pytest.raises(ShrinkflowError, match=r"evaluate\.device: 'cuda', but .*TFLite"):
        evaluate.evaluate_model(_device_cfg("cuda"), int8, data)


def test_cuda_without_a_gpu_is_refused(nodes, monkeypatch):
    folder, _, data, _ = nodes
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    with pytest.raises(ShrinkflowError, match=r"evaluate\.device: 'cuda' but no GPU is visible"):
        evaluate.evaluate_model(_device_cfg("cuda"), folder, data)


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="needs a GPU")
def test_a_keras_node_runs_on_the_gpu(nodes, keras_result):
    folder, _, data, _ = nodes
    on_gpu = evaluate.evaluate_model(_device_cfg("cuda"), folder, data)
    assert on_gpu["device"] == "cuda" and on_gpu["peak_mem_method"] == "tf_gpu_peak"
    assert on_gpu["peak_mem_mb"] > 0
    for key in ("params", "measured_sparsity", "macs", "size_bytes"):
        assert on_gpu[key] == keras_result[key], key
    assert on_gpu["top1"] == pytest.approx(keras_result["top1"], abs=0.02)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_tflite_file_gives_a_one_line_error(nodes, tmp_path, damage):
    _, int8, data, _ = nodes
    shutil.copy(int8 / SPEC_FILE, tmp_path / SPEC_FILE)
    good = (int8 / TFLITE_FILE).read_bytes()
    bad = b"not a flatbuffer" * 64 if damage == "garbage" else good[: len(good) // 2]
    (tmp_path / TFLITE_FILE).write_bytes(bad)
    with pytest.raises(ShrinkflowError) as raised:
        evaluate.evaluate_model(CFG, tmp_path, data)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / TFLITE_FILE}: ")


@pytest.mark.parametrize("node", [0, 1])
def test_data_of_another_shape_is_refused(nodes, node):
    folder = nodes[node]
    other = PreparedData(
        images=np.zeros((4, 8, 8, 3), dtype=np.uint8),
        labels=np.zeros(4, dtype=np.int64),
        train=np.arange(2),
        val=np.arange(2, 3),
        test=np.arange(3, 4),
        classes=[str(c) for c in range(10)],
        mean=(0.5,) * 3,
        std=(0.2,) * 3,
        manifest={"fingerprint": "other"},
    )
    with pytest.raises(ShrinkflowError, match="model expects 1-channel 8px images"):
        evaluate.evaluate_model(CFG, folder, other)


def test_count_macs_matches_the_hand_formula():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.Conv2D(6, 3, strides=2, padding="valid"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    first = 8 * 8 * 4 * (3 * 3 * 1)  # one MAC per output element per kernel tap
    second = 3 * 3 * 6 * (3 * 3 * 4)
    dense = (3 * 3 * 6) * 10
    assert evaluate.count_macs(model) == first + second + dense


def test_a_fixed_point_node_is_measured_on_its_own_file(nodes, keras_result, tmp_path):
    folder, _, data, _ = nodes
    quantize_model(CFG, "fixed_w8", folder, data, JobContext(tmp_path, tmp_path))
    result = evaluate.evaluate_model(QUICK, tmp_path, data, reference_dir=folder)
    # Keras runs both: the reference is the same-runtime float model, nothing is converted.
    assert result["runtime"] == result["reference_runtime"] == "keras"
    assert result["float_latency_ms_b1"] == result["reference_latency_ms_b1"]
    assert result["speedup_b1"] == result["latency_speedup"]
    assert result["size_bytes"] == (tmp_path / FIXED_FILE).stat().st_size
    assert result["size_bytes"] < 0.5 * keras_result["size_bytes"]
    assert result["params"] == keras_result["params"]
    assert result["top1"] == pytest.approx(keras_result["top1"], abs=0.03)
    check_layer_sparsity(result, nodes[3])
