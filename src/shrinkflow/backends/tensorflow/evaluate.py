"""`shrinkflow evaluate` for TensorFlow: accuracy, size, MACs, latency, throughput and memory.

Every figure is measured on the saved model file, as the torch backend does, and the returned
keys are torch's, so both backends share one summary table. Two kinds of node are measured:

- a Keras model (``model.keras``, or ``model.fixed.npz``, fixed-point weights that load as a
  float model), run as one ``tf.function`` graph per batch size with a fixed input signature,
  so timing measures the graph rather than Python's layer dispatch;
- a TFLite file (``model.tflite``), run by one interpreter per batch size (resized and
  allocated once), with as many threads as TensorFlow computes with (``default_threads``).

Both take raw 0..255 pixels (the models normalise their input) and are scored in batches of
the throughput batch size, the last one zero-padded: in inference mode an image's logits do
not depend on the rest of its batch. With a ``reference`` model (the Keras model a TFLite file
came from) both are timed in the same process, taking turns call by call; where the two run in
different runtimes (``runtime``: ``keras`` or ``tflite``) the reference converted to a TFLite
float32 file is timed with them, so that a TFLite artefact's speed-up (``speedup_b1``) is
taken against float in its own runtime rather than against Keras' per-call overhead.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import functools  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Protocol  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow import measure, metrics  # noqa: E402
from shrinkflow.backends.tensorflow import stored_weights, tflite  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import (  # noqa: E402
    TFLITE_FILE,
    load_model,
    model_file,
    read_spec,
    write_spec,
)
from shrinkflow.backends.tensorflow.weights import (  # noqa: E402
    Counts,
    LayerCount,
    count_params,
    unwrap,
)
from shrinkflow.data.prepared import PreparedData, check_fits  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402

# The layers whose multiply-accumulates are counted (torch counts convolutions and matrix
# products; biases, norms and activations are left out, the usual convention).
MAC_LAYERS = (keras.layers.Conv2D, keras.layers.Dense)


class Runner(Protocol):
    """A model prepared for batches of exactly ``batch`` images."""

    batch: int

    def feed(self, images: np.ndarray) -> Any:
        """uint8 ``(batch, H, W, C)`` pixels as the model's input, placed where it runs."""
        ...

    def __call__(self, x: Any) -> np.ndarray:
        """Float32 logits of ``x``; returns once they are computed (on a GPU too)."""
        ...


def _device(cfg: dict) -> str:
    name = cfg["evaluate"]["device"]
    if name not in ("cpu", "cuda"):
        raise ShrinkflowError(f"evaluate.device: {name!r} is not one of cpu, cuda")
    if name == "cuda" and not tf.config.list_physical_devices("GPU"):
        raise ShrinkflowError("evaluate.device: 'cuda' but no GPU is visible; use cpu")
    return name


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one image through ``model``'s Conv2D and Dense layers.

    A layer's MACs are its kernel size times its output positions (kernel_h * kernel_w * cin *
    cout * out_h * out_w for a convolution, in * out for a dense layer on a vector). Zeroed
    weights still count: MACs describe the dense computation a standard runtime performs.
    """
    total = 0
    for layer in model.layers:
        inner = unwrap(layer)
        if isinstance(inner, MAC_LAYERS):
            positions = int(np.prod(layer.output_shape[1:-1]))
            total += int(np.prod(inner.kernel.shape)) * positions
    return total


class KerasRunner:
    """A Keras model as one traced graph for batches of ``batch`` images on ``device``."""

    def __init__(self, model: keras.Model, batch: int, device: str) -> None:
        self.batch = batch
        self._device = "/GPU:0" if device == "cuda" else "/CPU:0"
        signature = tf.TensorSpec((batch, *model.input_shape[1:]), tf.float32)
        # Ops take the device scope they are traced in, so the graph runs on ``device`` even
        # where TensorFlow would otherwise place it on a visible GPU.
        with tf.device(self._device):
            self._function = tf.function(
                lambda pixels: model(pixels, training=False), input_signature=[signature]
            )
            self._graph = self._function.get_concrete_function()

    def feed(self, images: np.ndarray) -> tf.Tensor:
        with tf.device(self._device):
            return tf.constant(images.astype(np.float32))

    def __call__(self, x: tf.Tensor) -> np.ndarray:
        return self._graph(x).numpy()


@dataclass
class Subject:
    """A model file ready to measure: runners per batch size, and its static figures."""

    file: Path
    spec: dict
    runner_at: Callable[[int], Runner]  # batch size -> a runner for that size (cached)
    counts: Counts  # weights.count_params' keys
    macs: int


def load_subject(model_dir: Path, device: str, threads: int) -> Subject:
    """The model in ``model_dir``: its ``.tflite`` if it has one, else its Keras model (a
    fixed-point node's expanded to float; its file is the fixed-point one)."""
    model_dir = Path(model_dir)
    file = model_file(model_dir)
    if file.name != TFLITE_FILE:
        model, spec = load_model(model_dir)
        return Subject(
            file=file,
            spec=spec,
            runner_at=functools.cache(lambda batch: KerasRunner(model, batch, device)),
            counts=count_params(model),
            macs=count_macs(model),
        )
    if device != "cpu":
        raise ShrinkflowError(
            f"evaluate.device: {device!r}, but {file} is a TFLite model, which runs on the CPU; "
            "evaluate it with evaluate.device cpu"
        )
    spec = read_spec(model_dir)
    layers = tflite.weight_layers(file)
    return Subject(
        file=file,
        spec=spec,
        runner_at=functools.cache(lambda batch: tflite.Runner(file, batch, threads)),
        counts=tflite.count_params(layers),
        # Counted from the file's own conv and dense ops, as count_macs counts the Keras
        # layers: the same figure as the architecture it was converted from.
        macs=sum(layer.macs for layer in layers),
    )


def runtime(subject: Subject) -> str:
    """What runs ``subject``: ``tflite`` for a ``.tflite`` file, else ``keras`` (a Keras model,
    a fixed-point one included: it runs as the float model its integer weights describe)."""
    return "tflite" if subject.file.name == TFLITE_FILE else "keras"


def tflite_float32(keras_dir: Path, folder: Path, threads: int) -> Subject:
    """The Keras model in ``keras_dir`` as a TFLite float32 file in ``folder`` (converted as the
    ``float32`` quant method converts it, ``tflite.convert``): the float model a TFLite
    artefact of it is timed against in its own runtime."""
    model, spec = load_model(keras_dir)
    (folder / TFLITE_FILE).write_bytes(tflite.convert(model, "float32", []))
    write_spec(spec, folder)
    return load_subject(folder, "cpu", threads)


def logits(runner: Runner, images: np.ndarray) -> np.ndarray:
    """Float32 logits of uint8 ``images`` in batches of ``runner.batch``, the last one
    zero-padded to that size."""
    out = []
    for i in range(0, len(images), runner.batch):
        chunk = images[i : i + runner.batch]
        pad = runner.batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(runner(runner.feed(chunk))[: runner.batch - pad])
    return np.concatenate(out).astype(np.float32)


def _accuracy(runner: Runner, data: PreparedData) -> dict[str, float]:
    scores = {}
    for split in ("test", "val"):
        index = getattr(data, split)
        scores[split] = metrics.topk_accuracy(
            logits(runner, data.images[index]), data.labels[index]
        )
    return metrics.accuracy_figures(scores["test"], scores["val"], data)


def _timing_images(data: PreparedData, batch: int) -> np.ndarray:
    """The first ``batch`` test images (cycled when the split is smaller)."""
    return data.images[np.resize(data.test, batch)]


def _call_at(subject: Subject, data: PreparedData) -> measure.CallAt:
    """``subject``'s timed call at a batch size: its runner for that size on the first test
    images (``_timing_images``), fed as the runner takes them."""

    def call_at(batch: int) -> measure.Call:
        runner = subject.runner_at(batch)
        return functools.partial(runner, runner.feed(_timing_images(data, batch)))

    return call_at


def _memory_probe(device: str) -> measure.DevicePeak | None:
    """TensorFlow's GPU allocator statistics on a GPU; None on the CPU (the process's resident
    memory)."""
    if device != "cuda":
        return None

    def reset() -> int:
        tf.config.experimental.reset_memory_stats("GPU:0")
        return tf.config.experimental.get_memory_info("GPU:0")["current"]

    def peak() -> int:
        return tf.config.experimental.get_memory_info("GPU:0")["peak"]

    return measure.DevicePeak("tf_gpu_peak", reset, peak)


def evaluate_model(
    cfg: dict, model_dir: Path, data: PreparedData, reference_dir: Path | None = None
) -> dict[str, float | int | str | list[LayerCount]]:
    """Measure the model saved in ``model_dir`` on ``data`` as ``cfg['evaluate']`` says.

    Returns the keys of the torch backend's ``evaluate_model``: those of
    ``metrics.SUMMARY_COLUMNS`` it measures (``runtime``, ``test_images`` and ``val_images``
    included), plus ``val_top1``, ``prunable_weights``, ``prunable_nonzero``,
    ``layer_sparsity`` (the same counts per conv/dense layer, see ``weights.count_weights``),
    ``latency_ms_b1_p90``, ``latency_batch`` (always 1)/``throughput_batch``,
    ``peak_mem_method``, ``threads`` and ``device``; with ``reference_dir`` also
    ``metrics.reference_comparison``'s keys. Their same-runtime float model is the reference
    itself for a Keras artefact, and the reference converted to TFLite float32
    (``tflite_float32``) for a TFLite one, timed alongside the artefact and the Keras reference,
    whose ``latency_speedup`` is then cross-runtime.
    """
    device = _device(cfg)
    settings = cfg["evaluate"]
    threads = tflite.default_threads()
    subject = load_subject(Path(model_dir), device, threads)
    check_fits(subject.spec, data, subject.file)
    throughput_batch = max(settings["batch_sizes"])

    # Memory first (see measure.peak_memory), of the first inference at the throughput batch:
    # activations and workspace, which for a TFLite file is its tensor arena (see
    # ``tflite.Runner``) and for a Keras graph includes TensorFlow instantiating it, as torch's
    # first pass includes its lazy initialisation.
    first_pass = _call_at(subject, data)(throughput_batch)
    peak_mb, peak_method = measure.peak_memory(first_pass, _memory_probe(device))
    runner = subject.runner_at(throughput_batch)  # the same runner (cached): scored in its batches
    result: dict[str, float | int | str | list[LayerCount]] = {**_accuracy(runner, data)}
    result.update(subject.counts)
    result["macs"] = subject.macs
    result["size_bytes"] = metrics.file_bytes(subject.file)
    result["gzip_bytes"] = metrics.gzip_bytes(subject.file)
    # What the zeros buy on disk: nominal bytes and a sparse encoding (see stored_weights).
    result.update(stored_weights.encoding_sizes(Path(model_dir)))
    # The artefact, its reference and, where the two run in different runtimes, the float
    # model in the artefact's runtime: taking turns, call by call.
    timed = [subject]
    if reference_dir is not None:
        timed.append(load_subject(Path(reference_dir), device, threads))
    with tempfile.TemporaryDirectory(prefix="shrinkflow-float32-") as scratch:
        if len(timed) == 2 and runtime(timed[1]) != runtime(subject):
            timed.append(_same_runtime_float(subject, Path(reference_dir), Path(scratch), threads))
        speeds = measure.measure_speeds([_call_at(s, data) for s in timed], settings)
    result.update(
        measure.speed_figures(speeds[0], settings),
        peak_mem_mb=peak_mb,
        peak_mem_method=peak_method,
        threads=threads,
        device=device,
        runtime=runtime(subject),
    )
    if len(timed) > 1:
        # speeds[-1]: the float model in the artefact's runtime, the reference itself where
        # it runs in that runtime already (nothing converted).
        reference = timed[1]
        result.update(
            metrics.reference_comparison(
                result, reference.file, speeds[1], runtime(reference), speeds[-1]
            )
        )
    return result


def _same_runtime_float(
    subject: Subject, reference_dir: Path, folder: Path, threads: int
) -> Subject:
    """The float model in ``subject``'s runtime where its reference runs in another: the Keras
    reference of a TFLite artefact converted to TFLite float32 in ``folder``."""
    if runtime(subject) != "tflite":
        raise ShrinkflowError(
            f"--reference {reference_dir}: a TFLite file, but {subject.file} is a Keras model; "
            "a quantized model's reference is the Keras model it came from"
        )
    return tflite_float32(reference_dir, folder, threads)
