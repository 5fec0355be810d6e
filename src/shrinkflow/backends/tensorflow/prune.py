"""`shrinkflow prune` for TensorFlow: magnitude pruning of single weights, one-shot or gradual,
and (``structured_l1``, ``structured_random``, ``structured_sensitivity``) removal of whole
filters, in ``prune_structured``.

``l1_unstructured`` zeroes the smallest |w| of the trained baseline's Conv2D/Dense kernels once
(plain numpy: tfmot has no one-shot pruning, and none with one ranking across layers).
``gradual_polynomial`` and ``gradual_constant`` re-train the baseline under tfmot's
``PolynomialDecay`` resp. ``ConstantSparsity`` schedule, wrapping each pruned layer in
``prune_low_magnitude``. Either way the saved ``model.keras`` holds plain layers with the pruned
weights exactly zero (no tfmot wrapper, mask or step variables), and every fact returned is
measured on the saved file. Method names, cfg keys and returned facts are the torch backend's
(``backends/torch/prune.py``), so both backends' results line up.

Scope of the gradual methods: tfmot computes every wrapped layer's mask on its own, so they
prune each layer to the target whatever ``prune.scope`` says (a note is printed when it says
``global``). Refusing ``global`` would break the default params, which sweep one scope for all
methods and backends; a global ranking would need a mask update outside tfmot. ``l1_unstructured``
honours both scopes.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import itertools  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

# The wrapper class is not in tfmot's public API (pinned in pyproject.toml): prune_low_magnitude
# returns instances of it, and only it can tell a wrapped layer from a plain one.
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (  # noqa: E402
    PruneLowMagnitude,
)

from shrinkflow.backends.base import (  # noqa: E402
    PRUNE_METHODS,  # noqa: E402
    JobContext,  # noqa: E402
    check_scope,
    check_sparsity,
)
from shrinkflow.backends.tensorflow import prune_structured, weights  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import load_model, save_model  # noqa: E402
from shrinkflow.backends.tensorflow.device import distribution_strategy  # noqa: E402
from shrinkflow.backends.tensorflow.resume_state import job_fingerprint  # noqa: E402
from shrinkflow.backends.tensorflow.train import fit  # noqa: E402
from shrinkflow.backends.tensorflow.trainer import evaluate_split  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.progress import say  # noqa: E402
from shrinkflow.training import steps_per_epoch  # noqa: E402

METHODS = PRUNE_METHODS["tensorflow"]  # one list for this module and config validation


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ShrinkflowError(
            f"prune.methods: {method!r} is not available for backend tensorflow "
            f"(available: {', '.join(METHODS)})"
        )


def pruned_layers(model: keras.Model, exclude: Sequence[str]) -> list[keras.layers.Layer]:
    """``weights.prunable_layers``, refusing an ``exclude`` that leaves nothing to prune."""
    layers = weights.prunable_layers(model, exclude)
    if not layers:
        raise ShrinkflowError("prune.exclude: excludes every conv and dense layer")
    return layers


def magnitude_prune(kernels: list[np.ndarray], sparsity: float, scope: str) -> list[np.ndarray]:
    """Copies of ``kernels`` with the ``sparsity`` share of smallest |w| set to zero.

    ``scope`` "global" ranks all kernels' entries together (layers with small weights lose
    more), "layer" prunes every kernel to ``sparsity``. Exactly ``round(sparsity * n)`` entries
    are zeroed, as torch's ``L1Unstructured`` rounds; among equal magnitudes the earlier entry
    (layer order, then row-major) goes first, so the result is deterministic.
    """
    check_sparsity(sparsity)
    check_scope(scope)

    def prune_flat(flat: np.ndarray) -> np.ndarray:
        out = flat.copy()
        out[np.argsort(np.abs(flat), kind="stable")[: round(sparsity * flat.size)]] = 0.0
        return out

    if scope == "layer":
        return [prune_flat(k.reshape(-1)).reshape(k.shape) for k in kernels]
    flat = prune_flat(np.concatenate([k.reshape(-1) for k in kernels]))
    parts = np.split(flat, np.cumsum([k.size for k in kernels])[:-1])
    return [p.reshape(k.shape) for p, k in zip(parts, kernels, strict=True)]


def prune_one_shot(
    model: keras.Model, sparsity: float, scope: str, exclude: Sequence[str]
) -> list[str]:
    """Zero, in place, the smallest kernel entries of the non-excluded conv/dense layers;
    return the pruned layers' names."""
    layers = pruned_layers(model, exclude)
    pruned = magnitude_prune([weights.kernel(layer) for layer in layers], sparsity, scope)
    for layer, kernel in zip(layers, pruned, strict=True):
        layer.kernel.assign(kernel)
    return [layer.name for layer in layers]


def schedule_steps(cfg_gradual: dict[str, Any], steps_per_epoch: int) -> tuple[int, int]:
    """The (begin, end) pruning steps of tfmot's schedule, checked to reach the target.

    tfmot updates the masks at the 1-based steps s with begin <= s <= end and
    (s - begin) % frequency == 0; ``PolynomialDecay`` gives the final sparsity only at
    s == end itself, so an ``end`` between two updates would leave the model below the
    target. ``end`` is therefore moved down to the last update at or before
    round(end_fraction x steps): the target is reached up to frequency - 1 steps early,
    never missed. A schedule with no update at its end (pruning span shorter than one
    ``frequency``) is refused before anything trains.
    """
    epochs, frequency = int(cfg_gradual["epochs"]), int(cfg_gradual["frequency"])
    begin_fraction = float(cfg_gradual["begin_fraction"])
    end_fraction = float(cfg_gradual["end_fraction"])
    if epochs < 1:
        raise ShrinkflowError(f"prune.gradual.epochs: {epochs} is not >= 1")
    if frequency < 1:
        raise ShrinkflowError(f"prune.gradual.frequency: {frequency} is not >= 1")
    if begin_fraction >= end_fraction:
        raise ShrinkflowError(
            f"prune.gradual.end_fraction: {end_fraction} is not above "
            f"begin_fraction {begin_fraction}"
        )
    if steps_per_epoch < 1:
        raise ShrinkflowError("prune.gradual: the training split is empty, no step to prune in")

    def bounds(epochs: int) -> tuple[int, int]:
        total = epochs * steps_per_epoch
        return round(begin_fraction * total), round(end_fraction * total)

    def span(epochs: int) -> int:
        begin, end = bounds(epochs)
        return end - begin

    begin, end = bounds(epochs)
    if end - begin < frequency:
        # span(e) is rate x e up to the two roundings, so the scan starts near the answer.
        rate = (end_fraction - begin_fraction) * steps_per_epoch
        first = max(epochs + 1, math.floor((frequency - 1) / rate))
        enough = next(e for e in itertools.count(first) if span(e) >= frequency)
        where = (
            f"steps {begin}..{end} of {epochs} epochs x {steps_per_epoch} steps "
            f"(begin_fraction {begin_fraction}, end_fraction {end_fraction})"
        )
        if end <= begin:
            raise ShrinkflowError(
                f"prune.gradual.epochs: {epochs} leaves no step to prune in ({where}); "
                f"use >= {enough}"
            )
        raise ShrinkflowError(
            f"prune.gradual.frequency: {frequency} steps never reaches the target within the "
            f"{end - begin} pruning steps ({where}); use <= {end - begin}, or "
            f"prune.gradual.epochs >= {enough}"
        )
    return begin, begin + (end - begin) // frequency * frequency


def pruning_schedule(
    method: str, sparsity: float, cfg_gradual: dict[str, Any], begin: int, end: int
) -> tfmot.sparsity.keras.PruningSchedule:
    """tfmot's schedule for a gradual ``method`` from ``begin`` to ``end`` (``schedule_steps``)."""
    frequency = int(cfg_gradual["frequency"])
    if method == "gradual_constant":
        return tfmot.sparsity.keras.ConstantSparsity(sparsity, begin, end, frequency)
    initial = float(cfg_gradual["initial_sparsity"])
    if initial > sparsity:
        raise ShrinkflowError(
            f"prune.gradual.initial_sparsity: {initial} is above the target sparsity {sparsity}"
        )
    return tfmot.sparsity.keras.PolynomialDecay(initial, sparsity, begin, end, frequency=frequency)


def gradual_fingerprint(
    cfg: dict, method: str, sparsity: float, model_dir: Path, data: PreparedData
) -> str:
    """Hash of what decides a gradual run (the stage table's keys for this method's family, so
    adding a value to the sweep lists does not discard the resume states of other branches)."""
    point = {"method": method, "sparsity": float(sparsity)}
    return job_fingerprint("prune", cfg, point, data, model_dir)


def prunable_weights(model_dir: Path) -> int:
    """How many conv and dense kernel entries the model in ``model_dir`` has."""
    model, _ = load_model(model_dir)
    return int(weights.count_params(model)["prunable_weights"])


def prune_model(
    cfg: dict,
    method: str,
    sparsity: float,
    model_dir: Path,
    data: PreparedData,
    context: JobContext,
    sensitivity_dir: Path | None = None,
) -> dict[str, float | int]:
    """Prune the model in ``model_dir`` with ``method`` to ``sparsity``, into
    ``context.out_dir``.

    Every input is checked before anything is written or trained. The structured methods
    return ``prune_structured.prune_structured``'s facts (``sensitivity_dir``: the sensitivity
    stage's folder, read by ``structured_sensitivity`` only). The others return
    ``measured_sparsity`` (zeros over the pruned layers, counted in the saved file),
    ``val_top1``, ``params`` and ``nonzero_params`` of the saved model; the gradual methods add
    ``epochs``, ``best_epoch`` and ``resumed_from_epoch``.
    """
    check_method(method)
    check_sparsity(sparsity)
    p = cfg["prune"]
    check_scope(p["scope"])
    if method in prune_structured.METHODS:
        return prune_structured.prune_structured(
            cfg, method, sparsity, model_dir, data, context, sensitivity_dir
        )
    model, spec = load_model(model_dir)
    facts: dict[str, float | int] = {}
    if method == "l1_unstructured":
        prune_one_shot(model, sparsity, p["scope"], p["exclude"])
        save_model(model, spec, Path(context.out_dir))
    else:
        facts = _prune_gradually(
            cfg,
            method,
            sparsity,
            model,
            spec,
            model_dir,
            data,
            **context.fit_kwargs(),
        )
    return {**_saved_facts(cfg, Path(context.out_dir), data), **facts}


def _prune_gradually(
    cfg: dict,
    method: str,
    sparsity: float,
    model: keras.Model,
    spec: dict,
    model_dir: Path,
    data: PreparedData,
    *,
    out_dir: Path,
    resume_dir: Path,
    on_epoch: Callable[[int, dict[str, float]], None],
    run_id: str | None,
) -> dict[str, int]:
    """Re-train ``model`` under tfmot's schedule and save the best epoch AT the target.

    Only epochs that end after the schedule's last mask update compete for best-on-val, as in
    the torch backend: an earlier epoch carries fewer zeros, so it would often win on accuracy
    and be saved below the target. From the last update on the masks no longer change, and
    tfmot re-applies them in every forward pass and at every epoch's end.
    """
    p, g = cfg["prune"], cfg["prune"]["gradual"]
    per_epoch = steps_per_epoch(cfg, data)
    begin, end = schedule_steps(g, per_epoch)
    schedule = pruning_schedule(method, sparsity, g, begin, end)
    names = {layer.name for layer in pruned_layers(model, p["exclude"])}
    if p["scope"] == "global":
        say("prune.scope: tfmot prunes each layer to the target; 'global' applies to one-shot only")

    def fresh_copy(layer: keras.layers.Layer) -> keras.layers.Layer:
        clone = layer.__class__.from_config(layer.get_config())
        if layer.name in names:
            return tfmot.sparsity.keras.prune_low_magnitude(clone, pruning_schedule=schedule)
        return clone

    # Built in fit's strategy, as fit requires: fresh layers, then the baseline's weights.
    with distribution_strategy().scope():
        wrapped = keras.models.clone_model(model, clone_function=fresh_copy)
    for layer in wrapped.layers:
        inner = weights.unwrap(layer)
        inner.set_weights(model.get_layer(inner.name).get_weights())

    probe = _MaskedSparsity()

    def with_sparsity(epoch: int, metrics: dict[str, float]) -> None:
        on_epoch(epoch, {**metrics, "sparsity": probe.sparsity})

    def save(best: keras.Model, folder: Path) -> None:
        """The best epoch as plain layers holding the masked kernels (no tfmot variables)."""
        for layer in _wrappers(best):
            layer.pruning_obj.weight_mask_op()
        save_model(tfmot.sparsity.keras.strip_pruning(best), spec, folder)

    result = fit(
        wrapped,
        cfg,
        data,
        epochs=int(g["epochs"]),
        lr=float(g["lr"]),
        warmup_epochs=0,
        out_dir=out_dir,
        resume_dir=resume_dir,
        fingerprint=gradual_fingerprint(cfg, method, sparsity, model_dir, data),
        on_epoch=with_sparsity,
        run_id=run_id,
        spec=spec,
        # UpdatePruningStep first: it re-applies the masks at an epoch's end, before the probe.
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), probe],
        lr_key="prune.gradual.lr",
        select_from_epoch=math.ceil(end / per_epoch),
        save=save,
    )
    return {
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "resumed_from_epoch": result.resumed_from_epoch,
    }


def _wrappers(model: keras.Model) -> list[PruneLowMagnitude]:
    return [layer for layer in model.layers if isinstance(layer, PruneLowMagnitude)]


class _MaskedSparsity(keras.callbacks.Callback):
    """The zero share of the wrapped kernels times their masks (what the forward pass uses) at
    every epoch's end. Measured on the model being trained, ``self.model``: with mixed
    precision that is a float16 twin of the model handed to ``fit``."""

    def __init__(self) -> None:
        super().__init__()
        self.sparsity = 0.0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        zeros = total = 0
        for layer in _wrappers(self.model):
            for kernel, mask, _ in layer.pruning_vars:
                masked = kernel.numpy() * mask.numpy()
                zeros += masked.size - int(np.count_nonzero(masked))
                total += masked.size
        self.sparsity = zeros / total if total else 0.0


def _saved_facts(cfg: dict, out_dir: Path, data: PreparedData) -> dict[str, float | int]:
    """Sparsity, size and val top-1 of the model as saved in ``out_dir``."""
    model, _ = load_model(out_dir)
    counts = weights.count_params(model)
    _, val_top1 = evaluate_split(model, data, "val", int(cfg["train"]["batch_size"]))
    return {
        "measured_sparsity": weights.zero_share(pruned_layers(model, cfg["prune"]["exclude"])),
        "val_top1": val_top1,
        "params": counts["params"],
        "nonzero_params": counts["nonzero_params"],
    }
