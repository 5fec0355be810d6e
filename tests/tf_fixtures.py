"""Helpers shared by the TensorFlow test modules: one thread, the training params, the trained
digits baseline, TFLite conversion and the checks several modules make of a measured model."""

from __future__ import annotations

import functools
import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402
from data_fixtures import TRAIN_WITH_REGULARISATION, digits_data  # noqa: E402

from shrinkflow.backends.base import JobContext  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import save_model  # noqa: E402
from shrinkflow.backends.tensorflow.models import create_model  # noqa: E402
from shrinkflow.backends.tensorflow.quantize import METHODS, quantize_model  # noqa: E402
from shrinkflow.backends.tensorflow.weights import prunable_layers, unwrap  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.training import model_spec  # noqa: E402


def one_thread() -> None:
    """Compute with one thread: other jobs share the 2 CI cores, and CPU kernels are bit-exact
    only for a fixed thread count. TensorFlow fixes its thread pools when it first runs an op;
    when a test module imported earlier in the session got there first, its counts hold."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass


TRAIN_CFG = {
    "custom_models": {},
    "seed": 0,
    "train": {**TRAIN_WITH_REGULARISATION, "epochs": 2},
    "finetune": {"epochs": 1, "lr": 0.01, "distill": None},
}


def with_train(**changes) -> dict:
    """``TRAIN_CFG`` with ``changes`` to its ``train`` section."""
    return {**TRAIN_CFG, "train": {**TRAIN_CFG["train"], **changes}}


# ---------------------------------------------------------------- the trained baseline

# The 8x8 digits split of the torch tests: 1257 train, 180 val, 360 test images.
DATA = digits_data()


@functools.cache
def _trained_weights() -> tuple[np.ndarray, ...]:
    """Three epochs of plain Keras fit on ``DATA`` (~0.9 val top-1), once per process."""
    one_thread()
    keras.utils.set_random_seed(0)
    model = create_model("resnet20", 10, 1, 8, DATA.mean, DATA.std)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    train = np.asarray(DATA.train)
    model.fit(DATA.images[train].astype(np.float32), DATA.labels[train], 32, 3, verbose=0)
    return tuple(model.get_weights())


def trained_baseline(folder: Path) -> Path:
    """A resnet20 trained on ``DATA``, saved as a new baseline node in ``folder``: a copy of its
    own, to change at will. conftest's ``tf_digits_baseline`` is the shared, read-only one."""
    one_thread()  # before this process's first TensorFlow op, if it is the first
    model = create_model("resnet20", 10, 1, 8, DATA.mean, DATA.std)
    model.set_weights(list(_trained_weights()))
    folder.mkdir(parents=True)
    save_model(model, model_spec("resnet20", DATA), folder)
    return folder


# ---------------------------------------------------------------- TFLite conversion

TFLITE_CFG = {
    "seed": 0,
    "train": {"batch_size": 32},
    "quantize": {"methods": list(METHODS), "calibration_batches": 4},
    "evaluate": {"device": "cpu", "batch_sizes": [1, 16], "warmup": 1, "repeats": 3},
}


def quantize(method: str, source: Path, data: PreparedData, root: Path, cfg: dict = TFLITE_CFG):
    """``quantize_model`` of ``source`` by ``method`` into ``root/method``: (folder, facts)."""
    out = root / method
    out.mkdir(parents=True)
    facts = quantize_model(cfg, method, source, data, JobContext(out, root / "resume"))
    return out, facts


class Conversions:
    """``method -> (folder, facts)``: the TFLite conversions of one model, each made on first
    use and kept (conftest's ``tf_digits_conversions`` shares them across modules)."""

    def __init__(self, source: Path, data: PreparedData, root: Path) -> None:
        self.source, self.data, self.root = source, data, root
        self._made: dict[str, tuple[Path, dict]] = {}

    def __getitem__(self, method: str) -> tuple[Path, dict]:
        if method not in self._made:
            self._made[method] = quantize(method, self.source, self.data, self.root)
        return self._made[method]


# ---------------------------------------------------------------- measuring


def keras_top1(model: keras.Model, data: PreparedData, split: str = "test") -> float:
    index = getattr(data, split)
    predicted = model.predict(data.images[index].astype(np.float32), verbose=0).argmax(axis=1)
    return float(np.mean(predicted == data.labels[index]))


def interpreter_top1(path, data: PreparedData, split: str = "test") -> float:
    """Top-1 of a .tflite file computed without shrinkflow's runner: the split in one batch,
    pixels fed as they are (uint8 for a uint8 input, float32 otherwise)."""
    index = getattr(data, split)
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    source = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(source["index"], [len(index), 8, 8, 1])
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], data.images[index].astype(source["dtype"]))
    interpreter.invoke()
    scores = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    return float(np.mean(scores.argmax(axis=1) == data.labels[index]))


def check_layer_sparsity(counts: dict, model: keras.Model) -> None:
    """``layer_sparsity`` names ``model``'s conv and dense layers in order, with their kernel
    sizes, and sums to the prunable totals."""
    layers = counts["layer_sparsity"]
    kernels = {unwrap(layer).name: unwrap(layer).kernel for layer in prunable_layers(model)}
    assert all(set(entry) == {"layer", "weights", "nonzero"} for entry in layers)
    assert [entry["layer"] for entry in layers] == list(kernels)
    assert [entry["weights"] for entry in layers] == [
        int(np.prod(k.shape)) for k in kernels.values()
    ]
    assert all(0 <= entry["nonzero"] <= entry["weights"] for entry in layers)
    assert sum(entry["weights"] for entry in layers) == counts["prunable_weights"]
    assert sum(entry["nonzero"] for entry in layers) == counts["prunable_nonzero"]
