"""TensorFlow quantization: TFLite conversion by every method, calibration, the stored weights."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from tf_fixtures import TFLITE_CFG as CFG
from tf_fixtures import check_layer_sparsity, interpreter_top1, keras_top1, quantize

from shrinkflow.backends.tensorflow import tflite
from shrinkflow.backends.tensorflow.artifact import (
    KERAS_FILE,
    TFLITE_FILE,
    load_model,
    read_spec,
)
from shrinkflow.backends.tensorflow.evaluate import count_macs
from shrinkflow.backends.tensorflow.quantize import (
    METHODS,
    calibration_batches,
    resumable_quantize_run_id,
)
from shrinkflow.errors import ShrinkflowError

# resnet20: the stem, 9 blocks of two convs, two projection shortcuts and the output layer.
WEIGHT_LAYERS = 1 + 9 * 2 + 2 + 1


@pytest.fixture(scope="module")
def baseline(tf_digits_baseline):
    """conftest's trained resnet20 (read only), its data and the Keras model."""
    folder, data = tf_digits_baseline
    return folder, data, load_model(folder)[0]


@pytest.fixture(scope="module")
def converted(tf_digits_conversions):
    return {method: tf_digits_conversions[method] for method in METHODS}


def test_every_method_writes_a_tflite_node_with_the_source_spec(baseline, converted):
    folder = baseline[0]
    bits = {"static_int8": 8, "dynamic_int8": 8, "float16": 16, "float32": 32}
    for method, (out, facts) in converted.items():
        assert sorted(p.name for p in out.iterdir()) == ["model.tflite", "spec.json"], method
        assert read_spec(out) == read_spec(folder)
        assert facts["artifact"] == TFLITE_FILE and facts["bits"] == bits[method]
        assert facts["seconds"] > 0
        assert len(tflite.weight_layers(out / TFLITE_FILE)) == WEIGHT_LAYERS


def test_quantized_layers_are_counted_from_the_stored_weights(converted):
    counts = {method: facts["quantized_layers"] for method, (_, facts) in converted.items()}
    assert counts["float32"] == 0
    assert counts["static_int8"] == counts["float16"] == WEIGHT_LAYERS
    # Dynamic range leaves tensors under 1024 values in float: the 1-channel stem conv (144),
    # the first projection shortcut (512) and the output layer (640).
    assert counts["dynamic_int8"] == WEIGHT_LAYERS - 3
    dtypes = {
        method: {layer.filter.dtype for layer in tflite.weight_layers(out / TFLITE_FILE)}
        for method, (out, _) in converted.items()
    }
    assert dtypes == {
        "static_int8": {np.dtype(np.int8)},
        "dynamic_int8": {np.dtype(np.int8), np.dtype(np.float32)},
        "float16": {np.dtype(np.float16)},
        "float32": {np.dtype(np.float32)},
    }


def test_static_int8_is_small_takes_uint8_pixels_and_reports_calibration(converted):
    out, facts = converted["static_int8"]
    float_bytes = (converted["float32"][0] / TFLITE_FILE).stat().st_size
    assert (out / TFLITE_FILE).stat().st_size <= 0.3 * float_bytes
    source = Interpreter(model_path=str(out / TFLITE_FILE)).get_input_details()[0]
    assert source["dtype"] == np.uint8
    # The calibration pixels span 0..255, so a uint8 code is the pixel itself.
    assert source["quantization"] == (1.0, 0)
    assert (facts["input_scale"], facts["input_zero_point"]) == (1.0, 0)
    assert facts["calibration_batches"] == 4 and facts["calibration_images"] == 4 * 32
    for method in ("dynamic_int8", "float16", "float32"):
        assert "calibration_batches" not in converted[method][1]


def test_converted_models_keep_the_keras_accuracy(baseline, converted):
    _, data, model = baseline
    reference = keras_top1(model, data)
    assert reference > 0.8  # the fixture's model learned something to keep
    allowed = {"float32": 0.01, "float16": 0.01, "dynamic_int8": 0.03, "static_int8": 0.1}
    for method, (out, facts) in converted.items():
        top1 = interpreter_top1(out / TFLITE_FILE, data)
        assert abs(top1 - reference) <= allowed[method], (method, top1, reference)
        assert facts["val_top1"] == pytest.approx(interpreter_top1(out / TFLITE_FILE, data, "val"))
    assert interpreter_top1(converted["static_int8"][0] / TFLITE_FILE, data) > 0.5


def test_tflite_macs_match_the_keras_architecture(baseline, converted):
    model = baseline[2]
    expected = count_macs(model)
    for method, (out, _) in converted.items():
        layers = tflite.weight_layers(out / TFLITE_FILE)
        assert sum(layer.macs for layer in layers) == expected, method


def test_layer_sparsity_names_the_keras_layers_for_every_method(baseline, converted):
    model = baseline[2]
    for method, (out, _) in converted.items():
        layers = tflite.weight_layers(out / TFLITE_FILE)
        counts = tflite.count_params(layers)
        check_layer_sparsity(counts, model)
        assert [e["nonzero"] for e in counts["layer_sparsity"]] == [
            int(np.count_nonzero(layer.filter)) for layer in layers
        ], method


def test_layer_name_is_the_scope_of_the_conv_or_matmul_op():
    assert tflite.layer_name("resnet20/relu/Relu;resnet20/conv1/Conv2D") == "conv1"
    assert tflite.layer_name("resnet20/fc/MatMul1", "StatefulPartitionedCall:0") == "fc"
    assert tflite.layer_name("net/block/dw/depthwise") == "dw"
    # A folded constant names no layer: the op's output may, else the name stays as it is.
    assert tflite.layer_name("arith.constant3", "net/layer1_0_conv1/Conv2D1") == "layer1_0_conv1"
    assert tflite.layer_name("arith.constant3", "StatefulPartitionedCall:0") == "arith.constant3"


def test_calibration_uses_the_first_batches_of_a_seeded_permutation(baseline):
    data = baseline[1]
    batches = calibration_batches(CFG, data)
    order = np.random.default_rng(CFG["seed"]).permutation(data.train)
    assert [b.shape for b in batches] == [(32, 8, 8, 1)] * 4
    assert all(b.dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), data.images[order[:128]])
    other = calibration_batches({**CFG, "seed": 1}, data)
    assert not np.array_equal(np.concatenate(other), np.concatenate(batches))


def test_calibration_takes_every_batch_a_small_split_has(baseline):
    data = baseline[1]
    cfg = {**CFG, "quantize": {**CFG["quantize"], "calibration_batches": 100}}
    batches = calibration_batches(cfg, data)
    assert len(data.train) == 1257 < 100 * 32
    assert len(batches) == 40 and sum(len(b) for b in batches) == len(data.train)


def test_empty_calibration_is_refused(baseline, tmp_path):
    folder, data, _ = baseline
    cfg = copy.deepcopy(CFG)
    cfg["quantize"]["calibration_batches"] = 0
    with pytest.raises(ShrinkflowError, match=r"quantize\.calibration_batches: 0"):
        quantize("static_int8", folder, data, tmp_path, cfg)
    assert not (tmp_path / "static_int8" / TFLITE_FILE).exists()


@pytest.mark.parametrize("method", ["int4", "static_int4"])  # fixed_w<bits>: test_tf_fixed_point
def test_other_methods_are_refused_by_name(baseline, tmp_path, method):
    folder, data, _ = baseline
    with pytest.raises(ShrinkflowError) as raised:
        quantize(method, folder, data, tmp_path)
    message = str(raised.value)
    assert message == (
        f"--method: {method!r} is not available for backend tensorflow "
        "(available: static_int8, dynamic_int8, float16, float32, qat_int8)"
    )
    assert list((tmp_path / method).iterdir()) == []


def test_conversion_never_resumes(baseline, tmp_path):
    folder, data, _ = baseline
    assert resumable_quantize_run_id(CFG, "static_int8", folder, data, tmp_path) is None


def test_a_tflite_node_is_not_a_conversion_input(baseline, converted, tmp_path):
    data = baseline[1]
    with pytest.raises(ShrinkflowError, match=KERAS_FILE):
        quantize("float32", converted["float32"][0], data, tmp_path)


def test_a_narrower_calibration_range_quantizes_the_fed_pixels(baseline, tmp_path):
    folder, data, model = baseline
    dim = dataclasses.replace(data, images=data.images // 2)  # pixels 0..127: scale 127/255
    out, facts = quantize("static_int8", folder, dim, tmp_path)
    assert facts["input_scale"] == pytest.approx(127 / 255, rel=1e-3)
    assert facts["input_zero_point"] == 0
    runner = tflite.Runner(out / TFLITE_FILE, 16, threads=1)
    images = dim.images[dim.test[:16]]
    fed = runner.feed(images)
    assert fed.dtype == np.uint8
    np.testing.assert_array_equal(fed, np.round(images / facts["input_scale"]).astype(np.uint8))
    agree = runner(fed).argmax(axis=1) == model.predict(
        images.astype(np.float32), verbose=0
    ).argmax(axis=1)
    assert agree.mean() >= 0.8
