"""TensorFlow fixed-point weights: bit packing, the model.fixed.npz file and fixed_w<bits>."""

from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras
from tf_fixtures import DATA, check_layer_sparsity, trained_baseline

from shrinkflow import bitpack
from shrinkflow.backends.base import JobContext
from shrinkflow.backends.tensorflow import evaluate
from shrinkflow.backends.tensorflow.artifact import (
    FIXED_FILE,
    KERAS_FILE,
    SPEC_FILE,
    load_fixed_point,
    load_model,
    save_model,
)
from shrinkflow.backends.tensorflow.fixed_point import PACKED_FORMAT, quantized_kernels
from shrinkflow.backends.tensorflow.quantize import quantize_model
from shrinkflow.errors import ShrinkflowError

CFG = {"seed": 0, "train": {"batch_size": 64}}
BITS = (2, 4, 8, 16)
# resnet20: the stem, 2 convs in each of 9 blocks, 2 shortcut projections, the logits layer.
LAYERS = 1 + 18 + 2 + 1


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A trained resnet20 with zeros as pruning leaves them: conv1's first filter entirely, the
    smaller half of fc's kernel by magnitude."""
    folder = trained_baseline(tmp_path_factory.mktemp("tf_fixed") / "float")
    model, spec = load_model(folder)
    conv1, fc = model.get_layer("conv1").kernel, model.get_layer("fc").kernel
    conv1.assign(conv1.numpy() * (np.arange(conv1.shape[-1]) > 0))
    fc.assign(np.where(np.abs(fc.numpy()) < np.median(np.abs(fc.numpy())), 0.0, fc.numpy()))
    save_model(model, spec, folder)
    return folder


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory) -> dict[int, tuple[Path, dict]]:
    """``bits -> (folder, facts)`` of ``fixed_w<bits>`` at each of ``BITS``."""
    root = tmp_path_factory.mktemp("tf_fixed_out")
    result = {}
    for bits in BITS:
        out = root / f"w{bits}"
        out.mkdir()
        result[bits] = (
            out,
            quantize_model(CFG, f"fixed_w{bits}", source, DATA, JobContext(out, out)),
        )
    return result


def val_logits(model: keras.Model) -> np.ndarray:
    return model.predict(DATA.images[DATA.val].astype(np.float32), verbose=0)


@pytest.mark.parametrize("bits", range(2, 17))
def test_pack_then_unpack_returns_every_code(bits):
    limit = 2 ** (bits - 1) - 1
    rng = np.random.default_rng(bits)
    codes = rng.integers(-limit, limit + 1, (3, 5, 7), dtype=np.int32)
    codes[0, 0, :2] = (-limit, limit)
    stream = bitpack.pack(codes, bits)
    assert stream.dtype == np.uint8 and len(stream) == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(bitpack.unpack(stream, bits, codes.shape), codes)


def test_channels_along_the_last_axis_match_channels_along_the_first():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype(np.float32)
    codes, scale = bitpack.quantize_channels(kernel, 4, axis=-1)
    first, first_scale = bitpack.quantize_channels(np.moveaxis(kernel, -1, 0), 4, axis=0)
    np.testing.assert_array_equal(np.moveaxis(codes, -1, 0), first)
    np.testing.assert_array_equal(scale, first_scale)
    assert np.abs(codes).reshape(-1, 6).max(axis=0).tolist() == [7] * 6  # each peak is +-7
    with pytest.raises(ValueError, match="2..16"):
        bitpack.code_limit(17)


def test_the_file_loads_as_code_times_scale_and_keeps_zeros(source, quantized):
    original, source_spec = load_model(source)
    kernels = {id(k) for k in quantized_kernels(original)}
    for bits in BITS:
        folder, _ = quantized[bits]
        loaded, spec = load_fixed_point(folder)
        assert spec == source_spec
        for before, after in zip(original.weights, loaded.weights, strict=True):
            assert before.name == after.name
            if id(before) not in kernels:
                np.testing.assert_array_equal(after.numpy(), before.numpy(), before.name)
                continue
            codes, scale = bitpack.quantize_channels(before.numpy(), bits, axis=-1)
            expected = bitpack.dequantize_channels(codes, scale, axis=-1)
            np.testing.assert_array_equal(after.numpy(), expected, f"{before.name} at {bits}")
            assert np.all(after.numpy()[before.numpy() == 0] == 0), before.name
        assert not loaded.get_layer("conv1").kernel.numpy()[..., 0].any()
    ternary = load_fixed_point(quantized[2][0])[0].get_layer("layer1_0_conv1").kernel.numpy()
    for channel in np.moveaxis(ternary, -1, 0):
        assert len(np.unique(np.abs(channel))) <= 2  # {0, s}: codes -1, 0, +1


def test_fewer_bits_make_a_smaller_file(source, quantized):
    sizes = {bits: (quantized[bits][0] / FIXED_FILE).stat().st_size for bits in BITS}
    float_size = (source / KERAS_FILE).stat().st_size
    assert sizes[8] < 0.35 * float_size
    assert sizes[2] < sizes[4] < sizes[8] < sizes[16] < float_size
    # Packing, not zlib: the 4-bit codes take half the bytes of the 8-bit ones.
    kernel_values = sum(int(np.prod(k.shape)) for k in quantized_kernels(load_model(source)[0]))
    assert sizes[8] - sizes[4] == pytest.approx(kernel_values / 2, rel=0.02)


def test_quantize_reports_the_torch_facts_and_16_bits_keep_the_accuracy(source, quantized):
    for bits in BITS:
        folder, facts = quantized[bits]
        assert sorted(p.name for p in folder.iterdir()) == [FIXED_FILE, SPEC_FILE]
        assert facts["artifact"] == FIXED_FILE and facts["bits"] == bits
        assert facts["quantized_layers"] == LAYERS
        assert facts["seconds"] > 0
    reference = val_logits(load_model(source)[0])
    logits = val_logits(load_fixed_point(quantized[16][0])[0])
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-3 * np.abs(reference).max())
    float_top1 = float((reference.argmax(1) == DATA.labels[DATA.val]).mean())
    assert float_top1 > 0.5  # trained: the comparison is meaningful
    assert quantized[16][1]["val_top1"] == float_top1
    assert quantized[2][1]["val_top1"] < float_top1  # 2 bits cost accuracy: the score is real


def test_evaluate_counts_zero_codes_per_layer(source, quantized):
    original, _ = load_model(source)
    for bits in (2, 8):
        counts = evaluate.load_subject(quantized[bits][0], "cpu", 1).counts
        check_layer_sparsity(counts, original)
        codes = [
            bitpack.quantize_channels(k.numpy(), bits, -1)[0] for k in quantized_kernels(original)
        ]
        assert [e["nonzero"] for e in counts["layer_sparsity"]] == [
            int(np.count_nonzero(c)) for c in codes
        ], bits
        conv1 = counts["layer_sparsity"][0]
        assert conv1["layer"] == "conv1" and conv1["nonzero"] <= conv1["weights"] * 15 // 16


@pytest.mark.parametrize("method", ["fixed_w1", "fixed_w17"])
def test_bit_widths_outside_2_to_16_are_refused(source, tmp_path, method):
    with pytest.raises(ShrinkflowError, match=r"2\.\.16"):
        quantize_model(CFG, method, source, DATA, JobContext(tmp_path, tmp_path))
    assert list(tmp_path.iterdir()) == []


def rewrite(folder: Path, tmp_path: Path, change) -> Path:
    """A copy of the fixed-point node in ``folder`` whose arrays ``change`` edited in place."""
    with np.load(folder / FIXED_FILE, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    change(arrays)
    np.savez(tmp_path / FIXED_FILE, **arrays)
    (tmp_path / SPEC_FILE).write_bytes((folder / SPEC_FILE).read_bytes())
    return tmp_path


def lambda_model(arrays: dict) -> None:
    arrays.clear()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda x: x * 2)])
    arrays.update(
        format=np.array(PACKED_FORMAT.encode()), architecture=np.array(model.to_json().encode()),
        bits=np.array(8),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "not a readable fixed-point model"),
        ("garbage", "not a readable fixed-point model"),
        (lambda a: a.update(format=np.array(b"other/1")), "not a shrinkflow.tensorflow.fixed/1"),
        (lambda a: a.pop("w0.scale"), "weights do not describe a model"),
        (lambda a: a.update(extra=np.zeros(3)), "1 array.s. left over, first 'extra'"),
        (lambda a: a.update({"w0.codes": a["w0.codes"][:5]}), "weights do not describe a model"),
        (lambda_model, "Lambda layer"),  # opening the file never runs code from it
    ],
)
def test_a_damaged_file_is_named(quantized, tmp_path, damage, message):
    folder = quantized[4][0]
    if isinstance(damage, str):
        data = (folder / FIXED_FILE).read_bytes()
        broken = data[: len(data) // 2] if damage == "truncated" else b"x" * 99
        (tmp_path / FIXED_FILE).write_bytes(broken)
        (tmp_path / SPEC_FILE).write_bytes((folder / SPEC_FILE).read_bytes())
    else:
        rewrite(folder, tmp_path, damage)
    with pytest.raises(ShrinkflowError, match=message) as error:
        load_fixed_point(tmp_path)
    assert str(tmp_path / FIXED_FILE) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_file_is_named(tmp_path, quantized):
    (tmp_path / SPEC_FILE).write_bytes((quantized[4][0] / SPEC_FILE).read_bytes())
    with pytest.raises(ShrinkflowError, match=f"no {FIXED_FILE}"):
        load_fixed_point(tmp_path)
