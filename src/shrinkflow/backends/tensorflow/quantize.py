"""`shrinkflow quantize` for TensorFlow: one float Keras model -> one ``.tflite`` file.

The methods are TFLite conversions (see ``tflite``): ``static_int8`` (full-integer, activations
calibrated on ``quantize.calibration_batches`` training batches), ``dynamic_int8`` (int8
weights, float activations), ``float16`` (float16 weights) and ``float32`` (the plain
conversion). A pruned model's zeros survive: TFLite's int8 weights are symmetric (zero maps
to code 0), and float16 represents zero exactly.

Conversion takes seconds, so a job never resumes: ``resume_dir``, ``on_epoch`` and ``run_id``
are accepted for the backend interface (torch's QAT trains and resumes) and not used.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from shrinkflow.backends.base import EpochCallback
from shrinkflow.backends.tensorflow import tflite
from shrinkflow.backends.tensorflow.artifact import TFLITE_FILE, load_model, model_file, write_spec
from shrinkflow.backends.tensorflow.evaluate import logits
from shrinkflow.backends.tensorflow.tflite import METHODS
from shrinkflow.data.prepared import PreparedData, check_fits
from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say


def resumable_quantize_run_id(
    cfg: dict, method: str, model_dir: Path, data: PreparedData, resume_dir: Path
) -> str | None:
    """No TFLite conversion resumes (each takes seconds)."""
    return None


def calibration_batches(cfg: dict, data: PreparedData) -> list[np.ndarray]:
    """The first ``quantize.calibration_batches`` batches of ``train.batch_size`` training
    images in a permutation seeded by ``seed``, as raw float32 pixels (the model's input).

    Un-augmented training images: the activation ranges a deployed model meets. Fewer batches
    exist when the split is small; all of them are then used.
    """
    wanted = int(cfg["quantize"]["calibration_batches"])
    if wanted < 1:
        raise ShrinkflowError(f"quantize.calibration_batches: {wanted} is not in [1, inf)")
    if len(data.train) == 0:
        raise ShrinkflowError("prepared data has no training images to calibrate with")
    size = int(cfg["train"]["batch_size"])
    order = np.random.default_rng(cfg["seed"]).permutation(np.asarray(data.train))
    chosen = order[: wanted * size]
    return [
        data.images[chosen[i : i + size]].astype(np.float32) for i in range(0, len(chosen), size)
    ]


def quantize_model(
    cfg: dict,
    method: str,
    model_dir: Path,
    data: PreparedData,
    out_dir: Path,
    resume_dir: Path,
    on_epoch: EpochCallback,
    run_id: str | None,
) -> dict[str, float | int | str]:
    """Convert the Keras model in ``model_dir`` to ``out_dir/model.tflite`` by ``method``.

    Returns facts for the run: the artefact's file name, the weights' ``bits``, the conv and
    dense layers whose weights the file stores as int8 or float16 (``quantized_layers``),
    for ``static_int8`` the calibration batches and images seen and the input quantization
    (``input_scale``, ``input_zero_point``: 1 and 0 when the calibration pixels span 0..255),
    the val top-1 of the saved file run by the TFLite interpreter, and the seconds taken.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise ShrinkflowError(
            f"--method: {method!r} is not available for backend tensorflow "
            f"(available: {', '.join(METHODS)})"
        )
    calibration = calibration_batches(cfg, data) if method == "static_int8" else []
    model, spec = load_model(model_dir)  # validates the input before anything is written
    check_fits(spec, data, model_file(model_dir))
    say(f"quantize {method}: converting {spec['arch']} to TFLite")
    path = Path(out_dir) / TFLITE_FILE
    path.write_bytes(tflite.convert(model, method, calibration))
    write_spec(spec, out_dir)

    layers = tflite.weight_layers(path)
    facts: dict = {"artifact": TFLITE_FILE, "bits": tflite.BITS[method]}
    facts["quantized_layers"] = tflite.quantized_layers(layers)
    if method != "float32" and facts["quantized_layers"] == 0:
        raise ShrinkflowError(f"--method {method}: no layer of {spec['arch']} was quantized")
    runner = tflite.Runner(path, int(cfg["train"]["batch_size"]), tflite.default_threads())
    if method == "static_int8":
        facts["calibration_batches"] = len(calibration)
        facts["calibration_images"] = sum(len(batch) for batch in calibration)
        facts["input_scale"] = float(runner.input_scale)
        facts["input_zero_point"] = int(runner.input_zero_point)
        if (facts["input_scale"], facts["input_zero_point"]) != (1.0, 0):
            say(
                f"quantize {method}: the calibration pixels do not span 0..255, so the uint8 "
                f"input has scale {facts['input_scale']:.4g} and zero point "
                f"{facts['input_zero_point']}: pixels are quantized before they are fed"
            )
    predicted = logits(runner, data.images[data.val]).argmax(axis=1)  # check_fits: val not empty
    facts["val_top1"] = float(np.mean(predicted == data.labels[data.val]))
    facts["seconds"] = time.perf_counter() - started
    return facts
