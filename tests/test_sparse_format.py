"""The sparse weight archive (shrinkflow.sparse_format): round trips at every precision, its
sizes, and the archives of real torch int8 and TFLite int8 artefacts."""

import json
import zipfile

import numpy as np
import pytest
import torch  # before TensorFlow, in a process that loads both
from artifact_fixtures import SPEC
from typer.testing import CliRunner

from shrinkflow import bitpack, sparse_format
from shrinkflow.cli import app
from shrinkflow.errors import ShrinkflowError
from shrinkflow.sparse_format import StoredTensor

ZEROS = 0.7  # the share of zeroed weights the tests encode


def _zeroed(array: np.ndarray, rng: np.random.Generator, zero=0) -> np.ndarray:
    out = array.copy()
    out.reshape(-1)[rng.random(out.size) < ZEROS] = zero
    return out


def _tensors() -> dict[str, StoredTensor]:
    """One tensor of each precision, kernels ~70 % zero, plus dense extras."""
    rng = np.random.default_rng(0)
    weight = _zeroed(rng.normal(size=(16, 8, 3, 3)).astype(np.float32), rng)
    codes, scale = bitpack.quantize_channels(weight, 3, axis=0)
    zero_point = rng.integers(-4, 5, 32).astype(np.int8)
    int8 = rng.integers(-127, 128, (12, 32)).astype(np.int8)
    # Per output channel (axis 1), a zeroed weight is its channel's zero point.
    int8 = np.where(rng.random(int8.shape) < ZEROS, zero_point[None, :], int8).astype(np.int8)
    int8_scale = rng.uniform(0.001, 0.1, 32).astype(np.float32)
    return {
        "conv.weight": StoredTensor(weight, sparse=True),
        "conv16.weight": StoredTensor(weight.astype(np.float16), sparse=True),
        "fc.weight": StoredTensor(int8, True, int8_scale, zero_point, axis=1),
        "fixed.weight": StoredTensor(codes, sparse=True, scale=scale, axis=0, bits=3),
        "per_tensor.weight": StoredTensor(int8, True, np.float32(0.02), np.int8(0)),
        "bn.running_mean": StoredTensor(rng.normal(size=16).astype(np.float32)),
        "bn.num_batches_tracked": StoredTensor(np.array(7, dtype=np.int64)),
    }


def _same(a: dict[str, StoredTensor], b: dict[str, StoredTensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        x, y = a[key], b[key]
        assert x.values.dtype == y.values.dtype and np.array_equal(x.values, y.values), key
        assert (x.bits, x.axis, x.sparse) == (y.bits, y.axis, y.sparse), key
        for name in ("scale", "zero_point"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), (key, name)
        assert np.array_equal(x.dequantize(), y.dequantize()), key
        assert x.dequantize().dtype == y.dequantize().dtype, key


def test_every_precision_round_trips_exactly(tmp_path):
    tensors = _tensors()
    path = sparse_format.save(tmp_path / "w.npz", tensors, {"note": "x"})
    back, meta = sparse_format.read(path)
    _same(tensors, back)
    assert meta == {"note": "x"}
    # Dequantized values: code * scale for fixed-point, (code - zero point) * scale for int8.
    fixed = back["fixed.weight"]
    assert np.array_equal(
        fixed.dequantize(), bitpack.dequantize_channels(fixed.values, fixed.scale, 0)
    )
    fc = back["fc.weight"]
    expected = (fc.values.astype(np.float32) - fc.zero_point) * fc.scale
    assert np.array_equal(fc.dequantize(), expected)
    assert np.count_nonzero(fc.dequantize()) == np.count_nonzero(fc.nonzero())
    # A few arrays in all (index, mask, packed and one pool per dtype), not a few per tensor.
    with zipfile.ZipFile(path) as archive:
        names = sorted(n.removesuffix(".npy") for n in archive.namelist())
    assert names == ["float16", "float32", "index", "int64", "int8", "mask", "packed"]


def test_nominal_bytes_count_the_nonzero_codes_at_their_width():
    tensors = {
        # 3 non-zero float16 values: 6 bytes
        "a": StoredTensor(np.array([[0, 1.5], [2, -1]], np.float16), sparse=True),
        # 2 codes other than the zero point 3, 8 bits each, + 1 scale (4) + 1 zero point (1)
        "b": StoredTensor(np.array([[3, 3], [5, -2]], np.int8), True, np.float32(0.5), np.int8(3)),
        # 5 non-zero 3-bit codes (15 bits) + 2 float32 scales (64 bits)
        "c": StoredTensor(
            np.array([[1, 0, -3], [2, 2, 1]]), True, np.float32([1, 2]), axis=0, bits=3
        ),
        # dense: 1 non-zero int64 (8 bytes)
        "d": StoredTensor(np.array([0, 4], np.int64)),
    }
    bits = 3 * 16 + (2 * 8 + 32 + 8) + (5 * 3 + 2 * 32) + 64
    assert sparse_format.nominal_bytes(tensors) == -(-bits // 8) == 31


def test_sparse_int8_is_smaller_than_dense_int8_at_70_percent_zeros():
    rng = np.random.default_rng(1)
    codes = _zeroed(rng.integers(-127, 128, (64, 64, 3, 3)).astype(np.int8), rng)
    scale = rng.uniform(0.001, 0.1, 64).astype(np.float32)
    dense = {"w": StoredTensor(codes, False, scale, np.zeros(64, np.int8), axis=0)}
    sparse = {"w": StoredTensor(codes, True, scale, np.zeros(64, np.int8), axis=0)}
    dense_bytes, _ = sparse_format.sizes(dense)
    sparse_bytes, sparse_gzip = sparse_format.sizes(sparse)
    assert dense_bytes > codes.size  # one byte per code, plus the archive
    # 30 % of the codes and one mask bit per weight: 0.3 + 1/8 of the dense bytes.
    assert sparse_bytes < 0.45 * dense_bytes
    assert sparse_format.nominal_bytes(sparse) < sparse_bytes
    assert sparse_gzip <= sparse_bytes + 100  # random codes: gzip keeps about as much


@pytest.mark.parametrize(
    "content",
    [b"not a zip", b"PK\x03\x04broken", None, "missing"],
    ids=["text", "broken zip", "another npz", "missing"],
)
def test_a_file_that_is_not_an_archive_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "weights.npz"
    if content == "missing":
        pass
    elif content is None:
        np.savez(path, index=np.frombuffer(json.dumps({"format": "x"}).encode(), np.uint8))
    else:
        path.write_bytes(content)
    with pytest.raises(ShrinkflowError) as error:
        sparse_format.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_truncated_pool_is_refused(tmp_path):
    data = sparse_format.arrays(_tensors())
    data["int8"] = data["int8"][:-1]
    np.savez(tmp_path / "short.npz", **data)
    with pytest.raises(ShrinkflowError, match="short.npz: .*int8 data ends early"):
        sparse_format.load(tmp_path / "short.npz")


def _sparse_resnet20() -> torch.nn.Module:
    """A resnet20 (8x8, 1 channel, seed 0) with a ZEROS share of its conv/linear weights zeroed."""
    from shrinkflow.backends.torch.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1, image_size=8).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                module.weight.mul_(torch.rand_like(module.weight) >= ZEROS)
    return model


def _int8_program(folder):
    """A resnet20 (8x8, 1 channel) with 70 % of its conv/linear weights zeroed, quantized by
    PT2E static int8 and saved as a node's model.pt2."""
    from shrinkflow.backends.torch import pt2e, pt2e_archive

    model = _sparse_resnet20()
    folder.mkdir()
    prepared = pt2e.prepare(model, SPEC, "static")
    pt2e.calibrate(prepared, [torch.randn(4, 1, 8, 8)])
    pt2e_archive.save(pt2e.convert(prepared), SPEC, folder)
    node = {"backend": "torch", "model": "resnet20", "stage": "quantized", "seed": 0}
    (folder / "node.json").write_text(json.dumps({**node, "quant_method": "static_int8"}))
    return folder


def test_a_torch_int8_program_exports_and_round_trips(tmp_path):
    from shrinkflow.backends.torch import pt2e, pt2e_archive
    from shrinkflow.backends.torch.stored_weights import load_sparse_model, stored_weights

    folder = _int8_program(tmp_path / "node")
    out = tmp_path / "export" / "model.sparse.npz"
    result = CliRunner().invoke(app, ["export-sparse", "--in", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{out}: ")
    back, meta = sparse_format.read(out)
    assert meta["backend"] == "torch" and meta["file"] == "model.pt2"
    assert meta["spec"] == SPEC and meta["node"]["quant_method"] == "static_int8"
    _same(stored_weights(folder)[0], back)

    program, _ = pt2e_archive.load(folder)
    stored = pt2e.weight_tensors(program)
    int8 = {k: t for k, t in back.items() if t.values.dtype == np.int8}
    # resnet20's 19 3x3 and 2 shortcut convolutions and its linear layer
    assert len(int8) == len(pt2e.layer_weights(program)) == 22
    for key, tensor in int8.items():
        assert np.array_equal(tensor.values, stored[key].numpy())
        assert tensor.axis == 0 and tensor.scale.size == tensor.values.shape[0]
        assert tensor.sparse and not tensor.zero_point.any()  # symmetric: code 0 is 0.0
    assert np.mean([t.nonzero().mean() for t in int8.values()]) < 0.4
    # Sparse int8 beats the program's own file, and nominal bytes are below both.
    nominal = sparse_format.nominal_bytes(back)
    assert nominal < out.stat().st_size < (folder / "model.pt2").stat().st_size
    # Its tensors are the program's constants, not a state dict: no model to load them into.
    with pytest.raises(ShrinkflowError, match="not an export of a torch model.pt .*model.pt2"):
        load_sparse_model(out)


def test_a_tflite_int8_file_round_trips(tmp_path):
    import tf_keras as keras

    from shrinkflow.backends.tensorflow import tflite
    from shrinkflow.backends.tensorflow.stored_weights import tflite_weights

    # A small CNN: converting resnet20 takes 10 s; the file's tensors are of the same kinds.
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    rng = np.random.default_rng(0)
    for layer in (model.layers[0], model.layers[1], model.layers[3]):
        layer.kernel.assign(_zeroed(layer.kernel.numpy(), rng))
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype(np.float32))
    calibration = [rng.uniform(0, 255, (4, 8, 8, 1)).astype(np.float32)]
    path = tmp_path / "model.tflite"
    path.write_bytes(tflite.convert(model, "static_int8", calibration))

    tensors = tflite_weights(path)
    back = sparse_format.load(sparse_format.save(tmp_path / "w.npz", tensors))
    _same(tensors, back)
    filters = [layer.filter for layer in tflite.weight_layers(path)]
    kernels = [t for t in back.values() if t.sparse]
    assert len(filters) == len(kernels) == 3
    for stored in filters:
        (kernel,) = [t for t in kernels if np.array_equal(t.values, stored)]
        assert kernel.values.dtype == np.int8 and kernel.scale.size == stored.shape[0]
        assert kernel.axis == 0 and not kernel.zero_point.any()
        assert np.mean(kernel.values == 0) > 0.6  # the zeroed weights stay code 0
    # Full-integer: the biases are int32 codes with a scale per channel, stored dense.
    biases = [t for t in back.values() if t.values.dtype == np.int32 and t.scale is not None]
    assert len(biases) == 3 and not any(t.sparse for t in biases)
    assert sparse_format.sizes(tensors)[0] < path.stat().st_size


@pytest.mark.parametrize("bits", [None, 3], ids=["float", "fixed_w3"])
def test_a_torch_export_loads_back_as_the_model(tmp_path, bits):
    from shrinkflow.backends.torch.artifact import load_model, save_fixed_point, save_model
    from shrinkflow.backends.torch.stored_weights import load_sparse_model
    from shrinkflow.sparse_export import export

    model = _sparse_resnet20()
    folder = tmp_path / "node"
    folder.mkdir()
    node = {"backend": "torch", "model": "resnet20", "stage": "finetuned", "seed": 0}
    if bits is None:
        save_model(model, SPEC, folder)
    else:
        save_fixed_point(model, SPEC, bits, folder)
        node = {**node, "stage": "quantized", "quant_method": f"fixed_w{bits}"}
    (folder / "node.json").write_text(json.dumps(node))

    done = export(folder, tmp_path / "model.sparse.npz")
    assert done.nominal_bytes < done.file_bytes < done.source_bytes
    loaded, spec = load_sparse_model(tmp_path / "model.sparse.npz")
    expected, _ = load_model(folder)
    assert spec == SPEC
    state, reference = loaded.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    stored = sparse_format.load(tmp_path / "model.sparse.npz")
    assert {t.bits for t in stored.values() if t.sparse} == {bits}


def test_keras_float_and_fixed_point_weights_round_trip(tmp_path):
    from shrinkflow.backends.tensorflow.artifact import load_model, save_fixed_point, save_model
    from shrinkflow.backends.tensorflow.models import create_model
    from shrinkflow.backends.tensorflow.stored_weights import stored_weights

    model = create_model("resnet20", 10, in_channels=1, image_size=8, mean=[0.4], std=[0.3])
    rng = np.random.default_rng(0)
    for variable in model.weights:
        if "kernel" in variable.name:
            variable.assign(_zeroed(variable.numpy(), rng))
    (tmp_path / "float").mkdir()
    (tmp_path / "fixed").mkdir()
    save_model(model, SPEC, tmp_path / "float")
    save_fixed_point(model, SPEC, 4, tmp_path / "fixed")
    for name, bits in (("float", None), ("fixed", 4)):
        tensors, meta = stored_weights(tmp_path / name)
        back = sparse_format.load(sparse_format.save(tmp_path / f"{name}.npz", tensors, meta))
        _same(tensors, back)
        loaded, _ = load_model(tmp_path / name)  # a fixed-point file loads as code * scale
        assert list(back) == [v.name for v in loaded.weights]
        for tensor, weight in zip(back.values(), loaded.get_weights(), strict=True):
            assert np.array_equal(tensor.dequantize(), weight)
        kernels = [t for t in back.values() if t.sparse]
        assert len(kernels) == 22 and {t.bits for t in kernels} == {bits}
        assert all(t.axis == t.values.ndim - 1 for t in kernels if bits)  # Keras: output last
