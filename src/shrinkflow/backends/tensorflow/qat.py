"""Quantization-aware training (``qat_int8``) for TensorFlow: tfmot's fake quantization of a
float Keras model, fine-tuned with ``train.fit``, converted to a full-integer ``.tflite``.

- ``quantize_aware``: tfmot's annotate + apply (``quantize_annotate_layer``,
  ``quantize_apply``) with the 8-bit scheme: int8 per-channel symmetric conv kernels, per-tensor
  dense kernels, moving-average activation ranges, batch norm folded into its conv on
  conversion. tfmot's registry has no config for the model's input preprocessing
  (``Rescaling``, ``Normalization``): those stay float, and the last of them, which feeds the
  first conv, gets an output quantizer, so that the file quantizes once, after the
  preprocessing, and runs every conv, add and dense in int8 (float32 pixels in, float32
  logits out).
- A source with zeros (a pruned or fine-tuned sweep point) is trained under tfmot's
  prune-preserving scheme (``Default8BitPrunePreserveQuantizeScheme``): each kernel's fake
  quantizer multiplies by the source's zero mask, so the zeros reach the int8 file whatever
  QAT's updates do to the float variables. Without it QAT moves pruned weights off zero.
- ``train_qat``: ``quantize.qat.epochs`` at ``quantize.qat.lr`` (no warm-up) through
  ``train.fit``: best-on-val epoch, resume state per epoch (the fake quantizers' ranges and
  step counters are model variables, so a killed job resumes where it stopped).
- ``qat_int8``: the job, measured on the written file: its int8 tensors, its val top-1 and the
  zero share of its int8 conv/dense weights (``measured_sparsity``, what ``evaluate`` reports).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

# The schemes, registries and output-only config are not in tfmot's public API (pinned in
# pyproject.toml): quantize_apply takes a scheme, and a registry says which layers it quantizes.
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (  # noqa: E402, E501
    prune_preserve_quantize_registry,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (  # noqa: E402
    default_8bit_quantize_configs,
    default_8bit_quantize_registry,
    default_8bit_quantize_scheme,
)

from shrinkflow.backends.base import JobContext  # noqa: E402
from shrinkflow.backends.tensorflow import tflite, weights  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import (  # noqa: E402
    KERAS_FILE,
    TFLITE_FILE,
    load_model,
    write_spec,
)
from shrinkflow.backends.tensorflow.device import distribution_strategy  # noqa: E402
from shrinkflow.backends.tensorflow.distill import Teacher, load_teacher, teacher_point  # noqa: E402
from shrinkflow.backends.tensorflow.evaluate import logits  # noqa: E402
from shrinkflow.backends.tensorflow.resume_state import job_fingerprint  # noqa: E402
from shrinkflow.backends.tensorflow.train import fit  # noqa: E402
from shrinkflow.data.prepared import PreparedData, check_fits  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.progress import say  # noqa: E402
from shrinkflow.training import TrainResult  # noqa: E402
from shrinkflow.training.distill import distill_plan  # noqa: E402
from shrinkflow.training.fast_path import without_fast_path  # noqa: E402

METHOD = tflite.QAT_METHOD
SCHEMES = ("default_8bit", "prune_preserve_8bit")  # the ``qat_scheme`` fact


def quantize_fingerprint(
    cfg: dict, method: str, model_dir: Path, data: PreparedData, teacher_dir: Path | None = None
) -> str:
    """Hash of what decides a QAT run: its resume state is reused only on a match. A distilled
    run's includes its teacher's file."""
    point = {"qmethod": method, **teacher_point(distill_plan(cfg, teacher_dir))}
    return job_fingerprint("quantize", cfg, point, data, model_dir)


def kernel_sparsity(model: keras.Model) -> float:
    """The zero share of ``model``'s conv and dense kernels (all of them, the output layer's
    too: the weights a ``.tflite`` file's conv and dense ops hold)."""
    return float(weights.count_params(model)["measured_sparsity"])


def quantize_aware(model: keras.Model, preserve_zeros: bool) -> keras.Model:
    """``model`` with tfmot's fake quantization (new variables, ``model``'s weights), built in
    ``train.fit``'s strategy; ``preserve_zeros`` picks the prune-preserving scheme.

    Layers keep their names (no ``quant_`` prefix), so a ``.tflite`` file's layers read as the
    float model's. A layer tfmot cannot quantize is refused by name.
    """
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()

    def quantized(layer: keras.layers.Layer) -> bool:
        # Batch norm has no config of its own: tfmot's layout transforms fold it into the conv
        # before it (an annotated one: the converter then folds it into the int8 kernel).
        return registry.supports(layer) or isinstance(layer, keras.layers.BatchNormalization)

    def annotate(layer: keras.layers.Layer) -> keras.layers.Layer:
        if quantized(layer):
            return tfmot.quantization.keras.quantize_annotate_layer(layer)
        if layer.trainable_weights:
            raise ShrinkflowError(
                f"--method {METHOD}: layer {layer.name!r} ({type(layer).__name__}) has weights "
                "tfmot cannot quantize (it quantizes conv, dense, batch norm and weightless layers)"
            )
        if any(quantized(node.outbound_layer) for node in layer.outbound_nodes):
            # The input range of the quantized layers it feeds (the first conv).
            config = default_8bit_quantize_configs.Default8BitOutputQuantizeConfig()
            return tfmot.quantization.keras.quantize_annotate_layer(layer, config)
        return layer  # float preprocessing between float layers

    scheme = (
        _PrunePreserveScheme()
        if preserve_zeros
        else default_8bit_quantize_scheme.Default8BitQuantizeScheme()
    )
    with distribution_strategy().scope():
        annotated = keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        try:
            with tfmot.quantization.keras.quantize_scope():
                return tfmot.quantization.keras.quantize_apply(
                    annotated, scheme, quantized_layer_name_prefix=""
                )
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ShrinkflowError(
                f"--method {METHOD}: tfmot cannot quantize this model ({reason})"
            ) from None


class _PrunePreserveRegistry(
    prune_preserve_quantize_registry.Default8bitPrunePreserveQuantizeRegistry
):
    """tfmot's prune-preserving registry, supporting only the layers the 8-bit registry
    supports: its own ``supports`` takes every weightless layer (``Rescaling`` too), for which
    it then asks the 8-bit registry for a config that does not exist, where the 8-bit scheme
    leaves such a layer float."""

    _default = default_8bit_quantize_registry.Default8BitQuantizeRegistry()

    def supports(self, layer: keras.layers.Layer) -> bool:
        return super().supports(layer) and self._default.supports(layer)


class _PrunePreserveScheme(tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme):
    """``Default8BitPrunePreserveQuantizeScheme`` with ``_PrunePreserveRegistry``."""

    def get_quantize_registry(self) -> _PrunePreserveRegistry:
        return _PrunePreserveRegistry()


def train_qat(
    model: keras.Model,
    cfg: dict,
    data: PreparedData,
    context: JobContext,
    *,
    fingerprint: str,
    spec: dict[str, Any],
    teacher: Teacher | None = None,
) -> TrainResult:
    """Fine-tune the fake-quantized ``model`` (``quantize_aware``) with ``train.fit``:
    ``quantize.qat.epochs`` at peak LR ``quantize.qat.lr``, no warm-up, the rest of the recipe
    ``train``'s; distilled from ``teacher`` when given. ``model`` holds the best-on-val epoch
    when this returns; nothing is written to ``context.out_dir`` (the caller converts it).

    Mixed precision and XLA are off: the fake quantizers compute in float32 (a float16 or
    bfloat16 twin would round their ranges).
    """
    qat = cfg["quantize"]["qat"]
    cfg = without_fast_path(cfg, f"quantize {METHOD}", "fake quantization runs in float32")
    say(f"quantize {METHOD}: {qat['epochs']} epoch(s) of quantization-aware training")
    return fit(
        model,
        cfg,
        data,
        epochs=int(qat["epochs"]),
        lr=float(qat["lr"]),
        warmup_epochs=0,
        fingerprint=fingerprint,
        **context.fit_kwargs(),
        spec=spec,
        lr_key="quantize.qat.lr",
        save=lambda trained, folder: None,
        teacher=teacher,
    )


def qat_int8(
    cfg: dict,
    model_dir: Path,
    data: PreparedData,
    context: JobContext,
    teacher_dir: Path | None = None,
    preserve_zeros: bool | None = None,
) -> dict[str, float | int | str]:
    """The ``qat_int8`` job: ``model_dir``'s Keras model trained quantization-aware, written
    to ``context.out_dir`` as ``model.tflite`` with its spec.

    ``preserve_zeros`` None (the DAG's case) uses the prune-preserving scheme exactly when the
    source's kernels hold zeros; True/False force a scheme (to compare them). Returns facts:
    the artefact, ``bits``, ``quantized_layers`` (conv/dense ops with int8 weights and int8
    activations), ``qat_*`` training figures (torch's keys), ``qat_scheme``,
    ``source_sparsity`` and ``measured_sparsity`` (the zero share of the file's int8 conv and
    dense weights) and ``val_top1`` of the file, run by the TFLite interpreter.
    """
    plan = distill_plan(cfg, teacher_dir)
    with distribution_strategy().scope():
        source, spec = load_model(Path(model_dir))  # validated before anything is written
    check_fits(spec, data, Path(model_dir) / KERAS_FILE)
    teacher = load_teacher(plan, data)
    source_sparsity = kernel_sparsity(source)
    preserve = source_sparsity > 0 if preserve_zeros is None else preserve_zeros
    model = quantize_aware(source, preserve)
    fingerprint = quantize_fingerprint(cfg, METHOD, Path(model_dir), data, teacher_dir)
    result = train_qat(
        model, cfg, data, context, fingerprint=fingerprint, spec=spec, teacher=teacher
    )

    path = Path(context.out_dir) / TFLITE_FILE
    path.write_bytes(tflite.convert(model, METHOD, []))
    write_spec(spec, context.out_dir)
    layers = tflite.weight_layers(path)
    not_int8 = [op for op in tflite.weight_op_types(path) if not op.all_int8]
    if not layers or not_int8:
        where = not_int8[0].describe() if not_int8 else "no conv or dense op"
        raise ShrinkflowError(
            f"--method {METHOD}: {spec['arch']} did not convert to int8 ({where})"
        )
    runner = tflite.Runner(path, int(cfg["train"]["batch_size"]), tflite.default_threads())
    predicted = logits(runner, data.images[data.val]).argmax(axis=1)  # check_fits: val not empty
    return {
        "artifact": TFLITE_FILE,
        "bits": tflite.BITS[METHOD],
        "quantized_layers": len(layers),
        "qat_epochs": result.epochs,
        "qat_best_epoch": result.best_epoch,
        "qat_resumed_from_epoch": result.resumed_from_epoch,
        "qat_best_val_top1": result.best_val_top1,
        "qat_scheme": SCHEMES[preserve],
        "source_sparsity": source_sparsity,
        "measured_sparsity": float(tflite.count_params(layers)["measured_sparsity"]),
        "val_top1": float(np.mean(predicted == data.labels[data.val])),
    }
