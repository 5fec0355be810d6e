"""TensorFlow quantization-aware training (``qat_int8``): tfmot's fake quantization, trained
with ``train.fit`` (resumable), converted to a full-integer ``.tflite`` that keeps a pruned
source's zeros under the prune-preserving scheme.

A small functional model stands in for the registry's (the path is the same for any functional
model; ResNet-20 takes ~30 s a QAT job): the registry's preprocessing, strided convs with
torch's explicit padding, a residual add, a max-pool, a concatenation, batch norm after every
conv, then pooling and the output layer. It is trained on the 8x8 digits, then 60 % of every
conv/dense kernel is zeroed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tf_keras as keras
from ai_edge_litert.interpreter import Interpreter
from data_fixtures import TRAIN
from tf_fixtures import DATA, TFLITE_CFG, interpreter_top1, keras_top1, one_thread
from tf_keras import layers

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.tensorflow import qat, tflite
from shrinkflow.backends.tensorflow.artifact import TFLITE_FILE, read_spec, save_model
from shrinkflow.backends.tensorflow.evaluate import evaluate_model
from shrinkflow.backends.tensorflow.finetune import KeepZeros, zero_masks
from shrinkflow.backends.tensorflow.prune import prune_one_shot
from shrinkflow.backends.tensorflow.quantize import quantize_model, resumable_quantize_run_id
from shrinkflow.errors import ShrinkflowError
from shrinkflow.nodes import expected_artifact
from shrinkflow.training import model_spec

SPARSITY = 0.6
WEIGHT_LAYERS = 6  # the small model's conv and dense layers
# Two epochs at a tenth of train.lr: large enough steps that QAT without the prune-preserving
# scheme moves pruned weights off zero by more than int8 rounds away.
CFG = {
    **TFLITE_CFG,
    "train": TRAIN,
    "finetune": {"epochs": 1, "lr": 0.01, "distill": None},
    "quantize": {**TFLITE_CFG["quantize"], "qat": {"epochs": 2, "lr": 0.005}},
}


def small_model() -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="pixels")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = layers.Normalization(mean=list(DATA.mean), variance=[s * s for s in DATA.std])(x)

    def conv_bn_relu(x, filters, kernel, stride, name):
        if stride > 1:
            x = layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        x = layers.Conv2D(filters, kernel, stride, "same" if stride == 1 else "valid",
                          use_bias=False, name=name)(x)  # fmt: skip
        return layers.ReLU(name=f"{name}_relu")(layers.BatchNormalization(name=f"{name}_bn")(x))

    x = conv_bn_relu(x, 16, 3, 1, "conv1")
    y = layers.BatchNormalization(name="conv2_bn")(
        layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv2")(x)
    )
    x = layers.ReLU(name="add_relu")(layers.Add(name="add")([x, y]))
    x = layers.MaxPooling2D(2, name="pool")(conv_bn_relu(x, 24, 3, 2, "conv3"))
    branches = [conv_bn_relu(x, 16, 1, 1, "branch1"), conv_bn_relu(x, 16, 3, 1, "branch2")]
    x = layers.GlobalAveragePooling2D(name="avgpool")(layers.Concatenate(name="cat")(branches))
    return keras.Model(inputs, layers.Dense(10, name="fc")(x), name="small")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(folder, val top-1): the small model trained on the digits, pruned to SPARSITY in every
    conv and dense kernel and fine-tuned with the zeros held (a fine-tuned sweep point)."""
    one_thread()
    keras.utils.set_random_seed(0)
    model = small_model()
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    train = np.asarray(DATA.train)
    images, labels = DATA.images[train].astype(np.float32), DATA.labels[train]
    model.fit(images, labels, 32, 6, verbose=0)
    prune_one_shot(model, SPARSITY, "layer", [])
    model.fit(images, labels, 32, 3, verbose=0, callbacks=[KeepZeros(zero_masks(model))])
    folder = tmp_path_factory.mktemp("tf-qat") / "source"
    folder.mkdir()
    save_model(model, model_spec("small", DATA), folder)
    return folder, keras_top1(model, DATA, "val")


@pytest.fixture(scope="module")
def preserved(source, tmp_path_factory):
    """``quantize_model``'s QAT of the pruned source, killed in its second epoch (after the
    first epoch's resume state was saved), then run again: (folder, facts, the run id the
    resume state offered between the two)."""
    root = tmp_path_factory.mktemp("tf-qat-preserved")
    resume = root / "resume"
    resume.mkdir()

    def crash_in_second_epoch(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    killed = root / "killed"
    killed.mkdir()
    with pytest.raises(KeyboardInterrupt):
        context = JobContext(killed, resume, crash_in_second_epoch, run_id="run-of-the-first-try")
        quantize_model(CFG, "qat_int8", source[0], DATA, context)
    offered = resumable_quantize_run_id(CFG, "qat_int8", source[0], DATA, resume)
    out = root / "out"
    out.mkdir()
    facts = quantize_model(CFG, "qat_int8", source[0], DATA, JobContext(out, resume))
    return out, facts, offered


@pytest.fixture(scope="module")
def plain(source, tmp_path_factory):
    """The same QAT with tfmot's plain 8-bit scheme forced (uninterrupted): (folder, facts)."""
    root = tmp_path_factory.mktemp("tf-qat-plain")
    (root / "out").mkdir()
    context = JobContext(root / "out", root / "resume")
    return root / "out", qat.qat_int8(CFG, source[0], DATA, context, preserve_zeros=False)


def zero_share_in_file(path) -> float:
    """Zeros over the int8 conv/dense filters of a .tflite, read with the interpreter alone."""
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    ops = [op for op in tflite.file_ops(path) if op.name in tflite.WEIGHT_OPS]
    filters = [interpreter.get_tensor(op.inputs[1]) for op in ops]
    assert filters and all(f.dtype == np.int8 for f in filters)
    return sum(f.size - np.count_nonzero(f) for f in filters) / sum(f.size for f in filters)


def test_qat_writes_a_full_integer_tflite(source, preserved):
    out, facts, _ = preserved
    assert sorted(p.name for p in out.iterdir()) == [TFLITE_FILE, "spec.json"]
    assert read_spec(out) == read_spec(source[0])
    assert (facts["artifact"], facts["bits"]) == (TFLITE_FILE, 8)
    types = tflite.weight_op_types(out / TFLITE_FILE)
    assert len(types) == facts["quantized_layers"] == WEIGHT_LAYERS
    assert all(op.all_int8 for op in types), [op.describe() for op in types]
    # Float only around the integer graph: pixels in, logits out; batch norm folded away.
    ops = [op.name for op in tflite.file_ops(out / TFLITE_FILE)]
    assert ops.count("QUANTIZE") == 1 and ops[-1] == "DEQUANTIZE"
    assert ops[ops.index("QUANTIZE") - 1] != "DEQUANTIZE"  # nothing int8 before the quantize
    details = Interpreter(model_path=str(out / TFLITE_FILE)).get_input_details()
    assert details[0]["dtype"] == np.float32
    assert sorted({layer.name for layer in tflite.weight_layers(out / TFLITE_FILE)}) == sorted(
        ["conv1", "conv2", "conv3", "branch1", "branch2", "fc"]
    )


def test_a_killed_qat_job_resumes_from_its_saved_epoch(preserved):
    _, facts, offered = preserved
    assert offered == "run-of-the-first-try"  # the stage continues that MLflow run
    assert (facts["qat_epochs"], facts["qat_resumed_from_epoch"]) == (2, 1)
    assert facts["qat_best_epoch"] in (1, 2)


def test_qat_keeps_the_source_accuracy_measured_on_the_file(source, preserved):
    out, facts, _ = preserved
    assert facts["val_top1"] == pytest.approx(interpreter_top1(out / TFLITE_FILE, DATA, "val"))
    assert facts["val_top1"] >= source[1] - 0.03


def test_prune_preserving_qat_keeps_the_zeros_that_plain_qat_loses(preserved, plain):
    (out, facts, _), (plain_out, plain_facts) = preserved, plain
    assert (facts["qat_scheme"], plain_facts["qat_scheme"]) == qat.SCHEMES[::-1]
    assert facts["source_sparsity"] == pytest.approx(SPARSITY, abs=0.01)
    in_file = zero_share_in_file(out / TFLITE_FILE)
    assert facts["measured_sparsity"] == pytest.approx(in_file)
    assert in_file >= facts["source_sparsity"] - 0.002  # int8 rounding adds zeros, never loses
    plain_in_file = zero_share_in_file(plain_out / TFLITE_FILE)
    assert plain_facts["measured_sparsity"] == pytest.approx(plain_in_file)
    assert plain_in_file < facts["source_sparsity"] - 0.05


def test_evaluate_reports_the_files_sparsity(preserved):
    out, facts, _ = preserved
    result = evaluate_model(CFG, out, DATA)
    assert result["measured_sparsity"] == pytest.approx(facts["measured_sparsity"])
    assert result["runtime"] == "tflite"
    assert result["val_top1"] == pytest.approx(facts["val_top1"])


def test_a_qat_node_of_tensorflow_promises_a_tflite_file(tmp_path):
    node = {"backend": "tensorflow", "model": "resnet20", "quant_method": "qat_int8"}
    expected = expected_artifact(node, tmp_path / "node.json")
    assert (expected.kind, expected.file) == ("tflite", TFLITE_FILE)


def test_a_layer_tfmot_cannot_quantize_is_named():
    inputs = keras.Input((8, 8, 1))
    x = layers.LayerNormalization(name="ln")(layers.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    with pytest.raises(ShrinkflowError) as raised:
        qat.quantize_aware(model, preserve_zeros=False)
    assert str(raised.value).startswith(
        "--method qat_int8: layer 'ln' (LayerNormalization) has weights tfmot cannot quantize"
    )


def test_mixed_precision_is_not_used_for_qat(source, tmp_path, monkeypatch):
    """train.mixed_precision would make a float16 twin whose fake quantizers round their
    ranges: QAT trains in float32 whatever the key says (and says so)."""
    seen = {}

    def fake_fit(model, cfg, data, **kwargs):
        seen["mixed_precision"] = cfg["train"]["mixed_precision"]
        raise KeyboardInterrupt

    monkeypatch.setattr(qat, "fit", fake_fit)
    cfg = copy.deepcopy(CFG)
    cfg["train"]["mixed_precision"] = True
    with pytest.raises(KeyboardInterrupt):
        qat.train_qat(keras.Sequential(), cfg, DATA, JobContext(tmp_path, tmp_path),
                      fingerprint="f", spec={})  # fmt: skip
    assert seen == {"mixed_precision": False}
    assert cfg["train"]["mixed_precision"] is True  # the caller's params are not changed
