"""Tests for the PyTorch evaluation stage (shrinkflow.backends.torch.evaluate)."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from shrinkflow import metrics
from shrinkflow.backends.torch import evaluate, fixed_point
from shrinkflow.backends.torch.artifact import (
    FORMAT,
    MODEL_FILE,
    load_model,
    save_fixed_point,
    save_model,
)
from shrinkflow.backends.torch.models import create_model
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError

CLASSES = [str(i) for i in range(10)]
MEAN, STD = (0.4,), (0.3,)
WARMUP, REPEATS = 2, 3
BATCHES = [1, 16]  # larger than the 10-image test split, so timing must cycle its images


def _cfg(device: str = "cpu") -> dict:
    return {
        "evaluate": {
            "device": device,
            "batch_sizes": BATCHES,
            "warmup": WARMUP,
            "repeats": REPEATS,
        }
    }


def _spec() -> dict:
    return {
        "arch": "resnet20",
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 8,
        "mean": list(MEAN),
        "std": list(STD),
        "classes": CLASSES,
    }


def _save(model: nn.Module, folder):
    folder.mkdir()
    save_model(model, _spec(), folder)
    return folder


def _independent_logits(model: nn.Module, images_uint8: np.ndarray) -> np.ndarray:
    """Logits computed without shrinkflow's tensor helpers: numpy normalization, NHWC -> NCHW."""
    x = (images_uint8.astype(np.float32) / 255.0 - MEAN[0]) / STD[0]
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random resnet20 and 40 digit-sized images whose test labels it gets 7/10 right."""
    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    test = np.arange(30, 40)
    predicted = _independent_logits(model, images[test]).argmax(axis=1)
    labels = rng.integers(0, 10, 40).astype(np.int64)
    labels[test] = predicted
    labels[test[:3]] = (predicted[:3] + 1) % 10  # three deliberate misses
    data = PreparedData(
        images=images,
        labels=labels,
        train=np.arange(20),
        val=np.arange(20, 30),
        test=test,
        classes=CLASSES,
        mean=MEAN,
        std=STD,
        manifest={"fingerprint": "test"},
    )
    folder = _save(model, tmp_path_factory.mktemp("eval") / "baseline")
    return model, data, folder


@pytest.fixture(scope="module")
def result(setup):
    _, data, folder = setup
    return evaluate.evaluate_model(_cfg(), folder, data)


def test_returns_every_measurement_with_summary_names(result):
    expected = {
        "top1",
        "top5",
        "val_top1",
        "params",
        "nonzero_params",
        "measured_sparsity",
        "macs",
        "size_bytes",
        "gzip_bytes",
        "nominal_bytes",
        "sparse_bytes",
        "sparse_gzip_bytes",
        "prunable_weights",
        "prunable_nonzero",
        "layer_sparsity",
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
    assert set(result) == expected
    assert expected & set(metrics.SUMMARY_COLUMNS) == {
        "top1",
        "val_top1",
        "top5",
        "test_images",
        "val_images",
        "runtime",
        "nominal_bytes",
        "sparse_bytes",
        "sparse_gzip_bytes",
        "params",
        "nonzero_params",
        "measured_sparsity",
        "macs",
        "size_bytes",
        "gzip_bytes",
        "latency_ms_b1",
        "throughput_ips",
        "peak_mem_mb",
    }
    assert result["device"] == "cpu" and result["runtime"] == "torch"
    assert (result["test_images"], result["val_images"]) == (10, 10)
    assert result["threads"] == torch.get_num_threads()
    assert result["latency_batch"] == 1 and result["throughput_batch"] == 16
    assert 0 < result["latency_ms_b1"] <= result["latency_ms_b1_p90"]
    assert result["throughput_ips"] > 0
    assert result["peak_mem_mb"] >= 0 and result["peak_mem_method"] in ("vmhwm", "ru_maxrss")


def test_accuracy_matches_an_independent_computation(setup, result):
    model, data, _ = setup
    assert result["top1"] == pytest.approx(0.7)
    logits = _independent_logits(model, data.images[data.test])
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert result["top5"] == pytest.approx(np.mean((top5 == data.labels[data.test, None]).any(1)))
    val_pred = _independent_logits(model, data.images[data.val]).argmax(axis=1)
    assert result["val_top1"] == pytest.approx(np.mean(val_pred == data.labels[data.val]))


def test_sizes_are_those_of_the_model_file(setup, result):
    folder = setup[2]
    assert result["size_bytes"] == (folder / MODEL_FILE).stat().st_size
    assert result["gzip_bytes"] == metrics.gzip_bytes(folder / MODEL_FILE)
    assert 0 < result["gzip_bytes"] < result["size_bytes"] * 1.01


def test_params_and_macs_of_the_dense_model(setup, result):
    model = setup[0]
    assert result["params"] == sum(p.numel() for p in model.parameters())
    # Biases start at exactly zero; the randomly drawn conv and linear weights do not.
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    assert result["nonzero_params"] == nonzero < result["params"]
    assert result["measured_sparsity"] == 0.0
    assert result["macs"] == evaluate.count_macs(model, (1, 1, 8, 8)) > 0


def test_zeroed_weights_are_counted_from_the_saved_file(setup, result, tmp_path):
    model, data, _ = setup
    pruned = create_model("resnet20", 10, in_channels=1, image_size=8)
    pruned.load_state_dict(model.state_dict())
    weight = pruned.layer1[0].conv1.weight
    zeroed = weight.numel() // 2
    with torch.no_grad():
        weight.view(-1)[:zeroed] = 0
    folder = _save(pruned, tmp_path / "pruned")

    after = evaluate.evaluate_model(_cfg(), folder, data)
    prunable = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    assert after["params"] == result["params"]
    assert after["nonzero_params"] == result["nonzero_params"] - zeroed
    assert after["measured_sparsity"] == pytest.approx(zeroed / prunable)
    assert after["macs"] == result["macs"]  # dense MACs: zeros are still multiplied
    before = {e["layer"]: e for e in result["layer_sparsity"]}
    for entry in after["layer_sparsity"]:
        lost = zeroed if entry["layer"] == "layer1.0.conv1" else 0
        assert entry["nonzero"] == before[entry["layer"]]["nonzero"] - lost, entry["layer"]


def test_count_macs_matches_the_hand_formula():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    conv = 4 * 8 * 8 * (1 * 3 * 3)  # one MAC per output element per kernel tap
    linear = (4 * 8 * 8) * 10
    assert evaluate.count_macs(model, (1, 1, 8, 8)) == conv + linear
    assert evaluate.count_macs(model, (3, 1, 8, 8)) == 3 * (conv + linear)


def test_timing_honours_warmup_repeats_and_uses_test_images(setup, monkeypatch):
    _, data, folder = setup
    inputs = []

    def spying_load(model_dir, device="cpu"):
        model, spec = load_model(model_dir, device)
        model.register_forward_hook(lambda _m, args, _out: inputs.append(args[0].clone()))
        return model, spec

    monkeypatch.setattr(evaluate, "load_model", spying_load)
    evaluate.evaluate_model(_cfg(), folder, data)

    timed = WARMUP + REPEATS
    by_batch = Counter(len(x) for x in inputs)
    # Batch 1: the MAC count plus timing; batch 16: the memory pass plus timing;
    # batch 10: one accuracy pass over each of the test and val splits.
    assert by_batch == {1: 1 + timed, 16: 1 + timed, 10: 2}

    cycled = np.resize(data.test, 16)
    expected = (data.images[cycled].astype(np.float32) / 255.0 - MEAN[0]) / STD[0]
    expected = torch.from_numpy(expected.transpose(0, 3, 1, 2).copy())
    batch16 = [x for x in inputs if len(x) == 16]
    assert all(torch.allclose(x, expected, atol=1e-6) for x in batch16)
    batch1 = [x for x in inputs if len(x) == 1 and x.abs().sum() > 0]  # MAC count feeds zeros
    assert len(batch1) == timed
    assert all(torch.allclose(x, expected[:1], atol=1e-6) for x in batch1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_accuracy_and_measures_device_memory(setup, result):
    _, data, folder = setup
    on_gpu = evaluate.evaluate_model(_cfg("cuda"), folder, data)
    assert on_gpu["device"] == "cuda" and on_gpu["peak_mem_method"] == "cuda_max_allocated"
    assert on_gpu["peak_mem_mb"] > 0
    for key in ("params", "nonzero_params", "measured_sparsity", "macs", "size_bytes"):
        assert on_gpu[key] == result[key], key
    # cuDNN (TF32 convolutions) may flip a near-tied prediction: one image of ten.
    for key in ("top1", "top5", "val_top1"):
        assert on_gpu[key] == pytest.approx(result[key], abs=0.1), key


def test_cuda_requested_without_a_gpu_names_the_key(setup, monkeypatch):
    _, data, folder = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ShrinkflowError, match=r"evaluate\.device"):
        evaluate.evaluate_model(_cfg("cuda"), folder, data)


def test_data_of_another_shape_is_refused(setup):
    _, data, folder = setup
    other = PreparedData(
        images=np.zeros((4, 8, 8, 3), dtype=np.uint8),
        labels=np.zeros(4, dtype=np.int64),
        train=np.arange(2),
        val=np.arange(2, 3),
        test=np.arange(3, 4),
        classes=CLASSES,
        mean=(0.5,) * 3,
        std=(0.2,) * 3,
        manifest={"fingerprint": "other"},
    )
    with pytest.raises(ShrinkflowError, match=MODEL_FILE):
        evaluate.evaluate_model(_cfg(), folder, other)


# --- per-layer sparsity -------------------------------------------------------------------


def _conv_linear(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _check_layer_sparsity(counts: dict, weights: dict[str, torch.Tensor]) -> None:
    """``layer_sparsity`` names the conv/linear layers of the float model in order, with their
    element counts, and sums to the prunable totals."""
    layers = counts["layer_sparsity"]
    assert all(set(entry) == {"layer", "weights", "nonzero"} for entry in layers)
    assert [entry["layer"] for entry in layers] == list(weights)
    assert [entry["weights"] for entry in layers] == [w.numel() for w in weights.values()]
    assert all(0 <= entry["nonzero"] <= entry["weights"] for entry in layers)
    assert sum(entry["weights"] for entry in layers) == counts["prunable_weights"]
    assert sum(entry["nonzero"] for entry in layers) == counts["prunable_nonzero"]


def _half_zeroed(model: nn.Module, layer: str) -> nn.Module:
    """A copy of ``model`` with the first half of ``layer``'s weight zeroed."""
    pruned = create_model("resnet20", 10, in_channels=1, image_size=8)
    pruned.load_state_dict(model.state_dict())
    weight = pruned.get_submodule(layer).weight
    with torch.no_grad():
        weight.view(-1)[: weight.numel() // 2] = 0
    return pruned.eval()


def test_layer_sparsity_of_a_float_model(setup, result):
    model = setup[0]
    weights = _conv_linear(model)
    _check_layer_sparsity(result, weights)
    assert result["layer_sparsity"][0]["layer"] == "conv1"
    assert result["layer_sparsity"][-1]["layer"] == "fc"
    assert [e["nonzero"] for e in result["layer_sparsity"]] == [
        int(torch.count_nonzero(w)) for w in weights.values()
    ]


def test_layer_sparsity_of_a_filter_pruned_model(setup, tmp_path):
    """Half the filters of layer1.0.conv1 removed, as structured pruning saves them."""
    model = setup[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        state[f"layer1.0.{key}"] = state[f"layer1.0.{key}"][:8].clone()
    state["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:, :8].clone()
    torch.save({"format": FORMAT, "spec": _spec(), "state_dict": state}, tmp_path / MODEL_FILE)

    counts = evaluate.load_subject(tmp_path, torch.device("cpu")).counts
    smaller, _ = load_model(tmp_path)
    _check_layer_sparsity(counts, _conv_linear(smaller))
    by_name = {e["layer"]: e["weights"] for e in counts["layer_sparsity"]}
    assert by_name["layer1.0.conv1"] == by_name["layer1.0.conv2"] == 8 * 16 * 3 * 3


def test_layer_sparsity_of_a_fixed_point_model(setup, tmp_path):
    model = _half_zeroed(setup[0], "layer2.0.conv1")
    save_fixed_point(model, _spec(), 4, tmp_path)

    counts = evaluate.load_subject(tmp_path, torch.device("cpu")).counts
    weights = _conv_linear(model)
    _check_layer_sparsity(counts, weights)
    # A zero is a zero code: 4-bit codes round the smallest weights to zero as well.
    codes = {n: fixed_point.quantize_weight(w, 4)[0] for n, w in weights.items()}
    assert [e["nonzero"] for e in counts["layer_sparsity"]] == [
        int(torch.count_nonzero(c)) for c in codes.values()
    ]
    conv = next(e for e in counts["layer_sparsity"] if e["layer"] == "layer2.0.conv1")
    assert conv["nonzero"] <= conv["weights"] // 2


class _Tiny(nn.Module):
    """A conv inside a Sequential and a linear layer: dotted and plain module names."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def test_layer_sparsity_of_an_int8_program(tmp_path):
    from shrinkflow.backends.torch import pt2e, pt2e_archive

    torch.manual_seed(0)
    model = _Tiny().eval()
    with torch.no_grad():
        model.features[0].weight.view(-1)[:18] = 0  # half of the conv's 36 weights
    spec = {**_spec(), "arch": "tiny"}
    prepared = pt2e.prepare(model, spec, "static")
    pt2e.calibrate(prepared, [torch.randn(4, 1, 8, 8)])
    pt2e_archive.save(pt2e.convert(prepared), spec, tmp_path)

    counts = evaluate.load_subject(tmp_path, torch.device("cpu")).counts
    _check_layer_sparsity(counts, _conv_linear(model))
    assert [e["layer"] for e in counts["layer_sparsity"]] == ["features.0", "fc"]
    program, _ = pt2e_archive.load(tmp_path)
    stored = [t for t in pt2e.weight_tensors(program).values() if t.ndim > 1]
    assert all(t.dtype == torch.int8 for t in stored)
    assert counts["prunable_weights"] == sum(t.numel() for t in stored)
    assert counts["prunable_nonzero"] == sum(int(torch.count_nonzero(t)) for t in stored)
    assert counts["layer_sparsity"][0]["nonzero"] <= 18  # int8 keeps every zero


def test_an_int8_program_is_timed_against_its_float_reference_in_torch(setup, tmp_path):
    """torch runs both, so the same-runtime float figures are the reference's own timing."""
    from shrinkflow.backends.torch import pt2e, pt2e_archive

    model, data, folder = setup
    prepared = pt2e.prepare(model.eval(), _spec(), "static")
    pt2e.calibrate(prepared, [torch.randn(4, 1, 8, 8)])
    pt2e_archive.save(pt2e.convert(prepared), _spec(), tmp_path)
    cfg = {"evaluate": {"device": "cpu", "batch_sizes": [1], "warmup": 0, "repeats": 2}}

    result = evaluate.evaluate_model(cfg, tmp_path, data, reference_dir=folder)
    assert result["runtime"] == result["reference_runtime"] == "torch"
    assert result["float_latency_ms_b1"] == result["reference_latency_ms_b1"]
    assert result["float_throughput_ips"] == result["reference_throughput_ips"]
    assert (
        result["speedup_b1"]
        == result["latency_speedup"]
        == pytest.approx(result["reference_latency_ms_b1"] / result["latency_ms_b1"])
    )
    assert result["throughput_speedup_same_runtime"] == result["throughput_speedup"]
