"""`shrinkflow quantize` for TensorFlow: one float Keras model -> one quantized artefact.

- ``static_int8``, ``dynamic_int8``, ``float16``, ``float32``: TFLite conversions to
  ``model.tflite`` (see ``tflite``): full-integer with activations calibrated on
  ``quantize.calibration_batches`` training batches, int8 weights with float activations,
  float16 weights, and the plain conversion;
- ``fixed_w<bits>``: fixed-point weights in ``model.fixed.npz`` (see ``fixed_point``);
- ``qat_int8``: quantization-aware training with tfmot, then the int8 TFLite conversion
  (``qat``): ``quantize.qat.epochs`` of fake-quantized fine-tuning (``train.fit``: resumable,
  best-on-val epoch kept), distilled from the baseline in ``teacher_dir`` when
  ``finetune.distill`` is set.

A pruned model's zeros survive: TFLite's int8 and the fixed-point weights are symmetric (zero
maps to code 0), float16 represents zero exactly, and QAT trains a source with zeros under
tfmot's prune-preserving scheme.

Only QAT trains, and resumes; the other methods take seconds and use only the context's
``out_dir``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.tensorflow import qat, tflite
from shrinkflow.backends.tensorflow.artifact import (
    FIXED_FILE,
    TFLITE_FILE,
    load_fixed_point,
    load_model,
    model_file,
    save_fixed_point,
    write_spec,
)
from shrinkflow.backends.tensorflow.evaluate import logits
from shrinkflow.backends.tensorflow.fixed_point import quantized_kernels
from shrinkflow.backends.tensorflow.resume_state import resumable_run_id
from shrinkflow.backends.tensorflow.tflite import METHODS
from shrinkflow.data.prepared import PreparedData, check_fits
from shrinkflow.errors import ShrinkflowError
from shrinkflow.metrics import topk_accuracy
from shrinkflow.progress import say
from shrinkflow.quantization import FIXED_PREFIX, calibration_count, parse_quant_method


def resumable_quantize_run_id(
    cfg: dict,
    method: str,
    model_dir: Path,
    data: PreparedData,
    resume_dir: Path,
    teacher_dir: Path | None = None,
) -> str | None:
    """Only QAT trains (and resumes); the other methods take seconds."""
    if parse_quant_method(method).family != "qat":
        return None
    fingerprint = qat.quantize_fingerprint(cfg, method, model_dir, data, teacher_dir)
    return resumable_run_id(resume_dir, fingerprint)


def calibration_batches(cfg: dict, data: PreparedData) -> list[np.ndarray]:
    """The first ``quantize.calibration_batches`` batches of ``train.batch_size`` training
    images in a permutation seeded by ``seed``, as raw float32 pixels (the model's input).

    Un-augmented training images: the activation ranges a deployed model meets. Fewer batches
    exist when the split is small; all of them are then used.
    """
    wanted = calibration_count(cfg, len(data.train))
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
    context: JobContext,
    teacher_dir: Path | None = None,
) -> dict[str, float | int | str]:
    """Quantize the Keras model in ``model_dir`` with ``method``; write it into ``context.out_dir``.
    Only QAT reads ``teacher_dir`` (its teacher, when ``finetune.distill`` is set).

    Returns facts for the run: the artefact's file name, the weights' ``bits``, the conv and
    dense layers whose weights the file stores quantized (``quantized_layers``), the val top-1
    of the saved file (run by the TFLite interpreter, or reloaded as Keras), the seconds taken
    and, for ``static_int8``, the calibration batches and images seen and the input
    quantization (``input_scale``, ``input_zero_point``: 1 and 0 when the calibration pixels
    span 0..255); QAT's are ``qat.qat_int8``'s.
    """
    started = time.perf_counter()
    if method == qat.METHOD:
        facts = qat.qat_int8(cfg, Path(model_dir), data, context, teacher_dir)
    elif method.startswith(FIXED_PREFIX):
        bits = parse_quant_method(method).bits
        facts = _quantize_fixed(cfg, bits, Path(model_dir), data, Path(context.out_dir))
    else:
        facts = _convert(cfg, method, Path(model_dir), data, Path(context.out_dir))
    facts["seconds"] = time.perf_counter() - started
    return facts


def _convert(cfg: dict, method: str, model_dir: Path, data: PreparedData, out_dir: Path) -> dict:
    """A TFLite conversion: ``out_dir/model.tflite``."""
    if method not in METHODS:
        raise ShrinkflowError(
            f"--method: {method!r} is not available for backend tensorflow "
            f"(available: {', '.join((*METHODS, qat.METHOD))})"
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
    return facts


def _quantize_fixed(
    cfg: dict, bits: int, model_dir: Path, data: PreparedData, out_dir: Path
) -> dict[str, float | int | str]:
    """``bits``-bit kernels: ``out_dir/model.fixed.npz``, measured reloaded from that file."""
    model, spec = load_model(model_dir)  # validates the input before anything is written
    check_fits(spec, data, model_file(model_dir))
    save_fixed_point(model, spec, bits, out_dir)
    reloaded, _ = load_fixed_point(out_dir)
    return {
        "artifact": FIXED_FILE,
        "bits": bits,
        "quantized_layers": len(quantized_kernels(model)),
        "val_top1": _keras_val_top1(reloaded, data, int(cfg["train"]["batch_size"])),
    }


def _keras_val_top1(model: Any, data: PreparedData, batch_size: int) -> float:
    """Top-1 of a Keras model on the val split (NaN when it is empty); it takes raw 0..255
    pixels."""
    index = np.asarray(data.val)
    if len(index) == 0:
        return float("nan")
    # Eager calls: one pass over the split does not repay tracing a graph (Model.predict).
    outputs = [
        model(data.images[index[i : i + batch_size]].astype(np.float32), training=False)
        for i in range(0, len(index), batch_size)
    ]
    return topk_accuracy(np.concatenate(outputs), data.labels[index], (1,))[1]
