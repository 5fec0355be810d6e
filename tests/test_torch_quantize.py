"""Tests for PyTorch quantization: PT2E int8 (static, dynamic, QAT) and fixed-point weights."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch_prune_fixtures import (  # noqa: F401 (fixed_threads: an autouse fixture)
    PRUNE_CFG,
    fixed_threads,
)

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch import evaluate, fixed_point, pt2e, pt2e_archive
from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model, save_model
from shrinkflow.backends.torch.quantize import quantize_model
from shrinkflow.errors import ShrinkflowError

QCFG = {
    **copy.deepcopy(PRUNE_CFG),
    "quantize": {"methods": [], "calibration_batches": 4, "qat": {"epochs": 1, "lr": 0.001}},
    "evaluate": {"device": "cpu", "batch_sizes": [1, 32], "warmup": 1, "repeats": 2},
}
# One batch size (one oneDNN lowering of an int8 program instead of two), one timed call: for
# tests that read accuracy, counts or sizes, which the timing settings do not change.
QUICK = {**QCFG, "evaluate": {"device": "cpu", "batch_sizes": [32], "warmup": 0, "repeats": 1}}
SPARSITY = 0.5


@pytest.fixture(scope="module")
def baseline(torch_digits_baseline):
    """conftest's resnet20 trained on the 8x8 digits, and the prepared data (read only)."""
    return torch_digits_baseline


@pytest.fixture(scope="module")
def sparse(baseline, tmp_path_factory):
    """The baseline with the smaller half of every conv and linear weight zeroed (a pruned
    and fine-tuned model as far as quantization can tell)."""
    folder, _ = baseline
    model, spec = load_model(folder)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                w.mul_(w.abs() > w.abs().flatten().kthvalue(int(SPARSITY * w.numel())).values)
    out = tmp_path_factory.mktemp("sparse")
    save_model(model, spec, out)
    return out


def _quantize(method, source, data, tmp_path, cfg=QCFG, on_epoch=None, resume=None):
    out = tmp_path / method
    out.mkdir(parents=True)
    resume = resume or tmp_path / f"{method}-resume"
    resume.mkdir(exist_ok=True)
    context = JobContext(out, resume, on_epoch or (lambda epoch, metrics: None))
    facts = quantize_model(cfg, method, source, data, context)
    return out, facts


def _zero_share(weights: list[torch.Tensor]) -> float:
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# --- fixed point --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 11, 16])
def test_pack_then_unpack_returns_every_code(bits):
    limit = 2 ** (bits - 1) - 1
    codes = torch.randint(-limit, limit + 1, (7, 3, 3, 3), dtype=torch.int32)
    stream = fixed_point.pack(codes, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(fixed_point.unpack(stream, bits, tuple(codes.shape)), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fixed_point_weights_are_symmetric_per_channel_and_keep_zeros(bits):
    torch.manual_seed(0)
    w = torch.randn(4, 8, 3, 3)
    w[1] = 0  # a pruned filter
    w[2, :, 0, 0] = 0  # pruned weights inside a filter
    codes, scale = fixed_point.quantize_weight(w, bits)
    limit = 2 ** (bits - 1) - 1
    assert codes.abs().max() <= limit and scale.shape == (4,)
    back = fixed_point.dequantize_weight(codes, scale)
    assert torch.equal(back[w == 0], torch.zeros(int((w == 0).sum())))
    for channel in (0, 2, 3):  # each channel's largest magnitude is represented exactly
        peak = w[channel].abs().max()
        assert back[channel].abs().max() == pytest.approx(float(peak), rel=1e-6)
    # round to nearest: never more than half a step from the float weight
    step = scale.view(-1, 1, 1, 1)
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())


def test_fixed_point_file_shrinks_with_bits_and_loads_as_its_integer_weights(baseline, tmp_path):
    folder, data = baseline
    float_bytes = (folder / MODEL_FILE).stat().st_size
    sizes = {}
    for bits in (8, 4, 2):
        out, facts = _quantize(f"fixed_w{bits}", folder, data, tmp_path)
        sizes[bits] = (out / MODEL_FILE).stat().st_size
        model, _ = load_model(out)
        source, _ = load_model(folder)
        for name in fixed_point.quantized_weight_names(source):
            loaded = model.get_parameter(name)
            codes, scale = fixed_point.quantize_weight(source.get_parameter(name), bits)
            assert torch.equal(loaded, fixed_point.dequantize_weight(codes, scale)), name
        assert facts["quantized_layers"] == 22 and facts["bits"] == bits
    # the weights dominate resnet20's file: about bits/32 of it, plus the float BN tensors
    assert sizes[8] < 0.3 * float_bytes
    assert sizes[2] < sizes[4] < sizes[8]
    assert sizes[4] < 0.6 * sizes[8]


# --- PT2E int8 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def static(baseline, tmp_path_factory):
    folder, data = baseline
    return _quantize("static_int8", folder, data, tmp_path_factory.mktemp("static"))


def test_static_int8_saves_int8_weights_for_every_conv_and_linear(static):
    out, facts = static
    assert facts["artifact"] == pt2e_archive.PT2_FILE and not (out / MODEL_FILE).exists()
    assert facts["calibration_batches"] == 4 and facts["calibration_images"] == 4 * 32
    program, spec = pt2e_archive.load(out)
    assert spec["arch"] == "resnet20"
    weights = [t for t in pt2e.weight_tensors(program).values() if t.ndim > 1]
    assert len(weights) == facts["quantized_layers"] == 22  # 21 convolutions and the output layer
    assert all(w.dtype == torch.int8 for w in weights)


def test_static_int8_runs_on_onednn_int8_kernels_and_agrees_with_its_graph(static, baseline):
    out, _ = static
    _, data = baseline
    program, spec = pt2e_archive.load(out)
    lowered = pt2e.lower(program, spec, 8)
    ops = {str(n.target) for n in lowered.graph.nodes if n.op == "call_function"}
    assert "onednn.qconv_pointwise.default" in ops, ops
    assert not any("aten.convolution" in op or "aten.conv2d" in op for op in ops)
    x = evaluate._timing_batch(data, spec, 8, torch.device("cpu"))
    with torch.no_grad():
        reference = program.module()(x)
        assert torch.allclose(lowered(x), reference, atol=0.05 * reference.abs().max())


@pytest.fixture(scope="module")
def static_evaluated(static, baseline) -> dict:
    """evaluate_model of the static int8 program, with the float baseline as reference."""
    return evaluate.evaluate_model(QCFG, static[0], baseline[1], reference_dir=baseline[0])


def test_int8_accuracy_stays_near_float_and_the_file_is_smaller(static, static_evaluated, baseline):
    out, _ = static
    folder, data = baseline
    result = static_evaluated
    float_result = evaluate.evaluate_model(QCFG, folder, data)
    assert result["top1"] == pytest.approx(float_result["top1"], abs=0.03)
    assert result["macs"] == float_result["macs"]
    assert result["reference_size_bytes"] == (folder / MODEL_FILE).stat().st_size
    assert result["size_bytes"] == (out / pt2e_archive.PT2_FILE).stat().st_size
    assert result["size_ratio"] == pytest.approx(
        result["size_bytes"] / result["reference_size_bytes"]
    )
    # int8 weights are a quarter of float32; the graph's JSON adds a fixed few hundred KB
    assert result["gzip_ratio"] < 0.35
    for key in ("latency_speedup", "throughput_speedup", "reference_latency_ms_b1"):
        assert result[key] > 0, key


def test_int8_artefact_is_evaluated_the_same_in_a_fresh_process(
    static, static_evaluated, baseline, tmp_path
):
    """A process that never quantized anything (nothing torchao registers while converting)
    loads the program and scores it as this one did. Accuracy is computed in batches of the
    largest batch size, 32 in both settings; timing does not change the compared values."""
    out, _ = static
    _, data = baseline
    data_file = tmp_path / "data.npz"
    np.savez(data_file, images=data.images, labels=data.labels, train=data.train,
             val=data.val, test=data.test)  # fmt: skip
    script = f"""
import json, numpy as np
from shrinkflow.backends.torch import evaluate
from shrinkflow.data.prepared import PreparedData
a = np.load({str(data_file)!r}, allow_pickle=False)
data = PreparedData(a["images"], a["labels"], a["train"], a["val"], a["test"],
                    {data.classes!r}, {tuple(data.mean)!r}, {tuple(data.std)!r}, {{}})
r = evaluate.evaluate_model({QUICK!r}, __import__("pathlib").Path({str(out)!r}), data)
print(json.dumps({{k: r[k] for k in ("top1", "top5", "val_top1", "params", "size_bytes")}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(fresh) == {"top1", "top5", "val_top1", "params", "size_bytes"}
    for key, value in fresh.items():
        assert value == static_evaluated[key], key


def test_quantization_keeps_a_pruned_models_zeros(sparse, baseline, tmp_path):
    _, data = baseline
    source_zeros = _zero_share([w for w in torch.load(sparse / MODEL_FILE, weights_only=True)[
        "state_dict"].values() if w.ndim > 1])  # fmt: skip
    assert source_zeros >= SPARSITY - 0.01
    for method in ("static_int8", "fixed_w4"):
        out, _ = _quantize(method, sparse, data, tmp_path)
        # evaluate's measured_sparsity: these counts of the loaded artefact (no need to time it)
        measured = evaluate.load_subject(out, torch.device("cpu")).counts["measured_sparsity"]
        # every zero stays zero; rounding may add a few more
        assert measured >= source_zeros, method
        assert measured < source_zeros + 0.1, method


def test_dynamic_int8_quantizes_the_linear_layers_only(baseline, tmp_path):
    folder, data = baseline
    out, facts = _quantize("dynamic_int8", folder, data, tmp_path)
    assert facts["quantized_layers"] == 1  # resnet20's one nn.Linear
    program, _ = pt2e_archive.load(out)
    weights = [t for t in pt2e.weight_tensors(program).values() if t.ndim > 1]
    assert sorted({str(w.dtype) for w in weights}) == ["torch.float32", "torch.int8"]
    assert sum(w.dtype == torch.int8 for w in weights) == 1
    result = evaluate.evaluate_model(QUICK, out, data)
    assert 0.0 <= result["top1"] <= 1.0


def test_qat_trains_keeps_zeros_and_resumes_after_an_interruption(sparse, baseline, tmp_path):
    """Two QAT epochs, interrupted in the second (after epoch 1's resume state was saved) and
    run again: it continues at epoch 2, and the int8 program keeps the pruned zeros.

    320 of the training images (10 steps an epoch: the time goes to torchao's prepare and
    convert, not to the steps) at lr 0.01, large enough that pruned weights QAT let move would
    outgrow int8 rounding: measured, a zero share of 0.40 when they are not held, 0.50 when
    they are."""
    data = dataclasses.replace(baseline[1], train=baseline[1].train[:320])
    cfg = copy.deepcopy(QCFG)
    cfg["quantize"]["qat"].update(epochs=2, lr=0.01)

    def crash_in_second_epoch(epoch, metrics):  # after epoch 1's resume state is saved
        if epoch == 2:
            raise KeyboardInterrupt

    resume = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt):
        _quantize("qat_int8", sparse, data, tmp_path / "a", cfg, crash_in_second_epoch, resume)
    out, facts = _quantize("qat_int8", sparse, data, tmp_path / "b", cfg, resume=resume)
    assert facts["qat_resumed_from_epoch"] == 1 and facts["qat_epochs"] == 2
    program, _ = pt2e_archive.load(out)
    weights = [t for t in pt2e.weight_tensors(program).values() if t.ndim > 1]
    assert all(w.dtype == torch.int8 for w in weights)
    assert _zero_share(weights) >= SPARSITY - 0.01  # fine-tuning did not revive pruned weights
    assert 0.5 < facts["val_top1"] <= 1.0


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "message"),
    [("int4", "not a quantization method"), ("fixed_w1", "2..16"), ("fixed_w32", "2..16")],
)
def test_unknown_methods_and_bit_widths_are_refused(method, message, baseline, tmp_path):
    folder, data = baseline
    with pytest.raises(ShrinkflowError, match=message):
        _quantize(method, folder, data, tmp_path)


def test_zero_calibration_batches_are_refused(baseline, tmp_path):
    folder, data = baseline
    cfg = copy.deepcopy(QCFG)
    cfg["quantize"]["calibration_batches"] = 0
    with pytest.raises(ShrinkflowError, match=r"quantize\.calibration_batches"):
        _quantize("static_int8", folder, data, tmp_path, cfg)


def test_a_model_export_cannot_capture_gets_one_line():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    spec = {"arch": "custom", "in_channels": 1, "image_size": 8}
    with pytest.raises(ShrinkflowError, match="torch.export cannot capture") as error:
        pt2e.capture(DataDependent(), spec)
    assert "\n" not in str(error.value)


def test_a_damaged_int8_file_is_named(static, tmp_path):
    out, _ = static
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (out / pt2e_archive.PT2_FILE).read_bytes()
    (broken / pt2e_archive.PT2_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ShrinkflowError, match="not a readable torch.export program"):
        pt2e_archive.load(broken)
