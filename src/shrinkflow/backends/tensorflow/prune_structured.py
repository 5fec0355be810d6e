"""`shrinkflow prune` for the structured methods on TensorFlow: whole filters leave, so the
Keras model (and its .keras and .tflite files, params and MACs) shrinks.

The torch backend's twin (``backends/torch/prune_structured.py``), with the same methods,
params, ratio rules (``shrinkflow.structured_ratios``) and returned facts. The layer groups
come from a walk of the Keras graph (``filter_groups``: convs whose outputs are summed lose the
same filters; batch norms and the next layers' inputs follow), and the smaller model is
rebuilt from the old one's config with fewer filters, holding the kept weights.

Filter choice: ``structured_l1`` ranks a group's channels by the L1 norm of the weights they
touch in its conv, depthwise and dense layers (their filters and the next layers' input
slices); ``structured_random`` by seeded random scores (the control); ``structured_sensitivity``
is ``structured_l1`` with per-group ratios from the sensitivity stage. Scope ``global`` ranks
all groups' channels together after dividing each group's scores by their mean (as
Torch-Pruning's default normaliser does), so layers of any fan-in compare.

``resume_dir`` is not used: pruning takes seconds, so a killed job starts over.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.base import JobContext  # noqa: E402
from shrinkflow.backends.tensorflow import weights  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import load_model, save_model  # noqa: E402
from shrinkflow.backends.tensorflow.device import distribution_strategy  # noqa: E402
from shrinkflow.backends.tensorflow.evaluate import count_macs  # noqa: E402
from shrinkflow.backends.tensorflow.filter_groups import (  # noqa: E402
    FilterGraph,
    filter_graph,
    l1_scores,
    shrink,
)
from shrinkflow.backends.tensorflow.trainer import Trainer, evaluate_split  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.progress import say  # noqa: E402
from shrinkflow.structured_ratios import plan_ratios, removable  # noqa: E402
from shrinkflow.training import TrainPlan  # noqa: E402
from shrinkflow.training.loop import train_in_memory  # noqa: E402

METHODS = ("structured_l1", "structured_random", "structured_sensitivity")


def channel_scores(
    graph: FilterGraph, method: str, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Each group's channel scores under ``method``'s criterion: low scores leave first."""
    if method == "structured_random":
        return {g.name: rng.random(g.channels) for g in graph.groups}
    return l1_scores(graph)


def choose_kept(
    graph: FilterGraph,
    scores: dict[str, np.ndarray],
    ratios: dict[str, float] | None,
    sparsity: float,
    initial: dict[str, int],
    fraction: float,
    max_ratio: float,
) -> tuple[dict[str, np.ndarray], int]:
    """The channels each group keeps at ``fraction`` of the way to its target, and how many
    groups were held back by ``max_ratio`` (of their ``initial`` filters; never the last one).

    As Torch-Pruning counts: a group (or, for ``ratios`` None, all groups together) targets
    ``int(initial * (1 - ratio * fraction))`` channels left.
    """
    current = {g.name: g.channels for g in graph.groups}
    allowed = {
        name: removable(initial[name], max_ratio) - (initial[name] - current[name])
        for name in current
    }
    wanted: dict[str, np.ndarray] = {}
    if ratios is None:
        target = sparsity * fraction
        total = sum(current.values()) - int(sum(initial.values()) * (1 - target))
        open_ = [name for name in current if allowed[name] > 0]
        if total > 0 and open_:
            flat = np.concatenate([_normalised(scores[name]) for name in open_])
            owner = np.concatenate([np.full(current[name], i) for i, name in enumerate(open_)])
            local = np.concatenate([np.arange(current[name]) for name in open_])
            lowest = np.argsort(flat, kind="stable")[:total]
            for i, name in enumerate(open_):
                picked = local[lowest[owner[lowest] == i]]
                wanted[name] = picked
    else:
        for name, count in current.items():
            ratio = min(ratios[name] * fraction, max_ratio)
            n = count - int(initial[name] * (1 - ratio))
            if n > 0:
                wanted[name] = np.argsort(scores[name], kind="stable")[:n]
    held, keep = 0, {}
    for name, count in current.items():
        removed = wanted.get(name, np.zeros(0, np.int64))
        if len(removed) > allowed[name]:
            held += 1
            order = np.argsort(scores[name][removed], kind="stable")
            removed = removed[order[: max(allowed[name], 0)]]
        keep[name] = np.setdiff1d(np.arange(count), removed)
    return keep, held


def _normalised(scores: np.ndarray) -> np.ndarray:
    mean = float(scores.mean()) if scores.size else 0.0
    return scores / mean if mean > 0 else scores


def param_count(model: keras.Model) -> int:
    return int(weights.count_params(model)["params"])


def val_top1(model: keras.Model, data: PreparedData, cfg: dict) -> float:
    """Top-1 on the val split; NaN when it is empty."""
    return evaluate_split(model, data, "val", int(cfg["train"]["batch_size"]))[1]


def recover(model: keras.Model, cfg: dict, data: PreparedData, epochs: int) -> None:
    """Train ``model`` in place for ``epochs`` at ``finetune.lr``: no warm-up, resume state,
    saving or best-epoch selection (the short recovery between rounds); the last epoch is
    kept. ``model`` must have been built in the distribution strategy's scope."""
    plan = TrainPlan(epochs, float(cfg["finetune"]["lr"]), 0, "finetune.lr")
    with tempfile.TemporaryDirectory(prefix="shrinkflow-round-") as scratch:
        trainer = Trainer(model, cfg, data, plan, Path(scratch), (), None, lambda _: None)
        train_in_memory(trainer, epochs)
    if trainer.trained is not model:  # mixed precision trained a float16 twin
        model.set_weights(trainer.trained.get_weights())


def _rebuilt(
    graph: FilterGraph, keep: dict[str, np.ndarray], method: str, arch: str
) -> keras.Model:
    """``filter_groups.shrink`` in the strategy's scope (the model may train next), with a
    one-line error where Keras cannot rebuild a custom model at its new widths."""
    try:
        with distribution_strategy().scope():
            return shrink(graph, keep)
    except Exception as e:  # Keras raises many kinds for a config it cannot build
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShrinkflowError(
            f"prune {method}: model {arch} cannot be rebuilt with fewer filters ({reason})"
        ) from None


def prune_structured(
    cfg: dict,
    method: str,
    sparsity: float,
    model_dir: Path,
    data: PreparedData,
    context: JobContext,
    sensitivity_dir: Path | None = None,
) -> dict[str, float | int]:
    """Remove the ``sparsity`` share of filters from the model in ``model_dir``; save it smaller.

    Pruning runs in ``prune.structured.rounds`` equal steps with ``round_epochs`` of
    fine-tuning (at ``finetune.lr``) between them, none after the last: the DAG's finetune
    stage follows. ``context.on_epoch(round, metrics)`` receives round, params, macs and
    val_top1 measured right after each round's pruning. Nothing is resumed.

    Returns ``measured_sparsity`` (share of conv and dense kernel entries removed),
    ``val_top1``, ``params``, ``params_before``, ``macs``, ``macs_before`` and
    ``layer_groups``.
    """
    if method not in METHODS:
        raise ShrinkflowError(f"prune.methods: {method!r} is not one of {', '.join(METHODS)}")
    settings = cfg["prune"]["structured"]
    rounds, round_epochs = int(settings["rounds"]), int(settings["round_epochs"])
    if rounds < 1:
        raise ShrinkflowError(f"prune.structured.rounds: {rounds} is not >= 1")
    max_ratio = float(settings["max_layer_ratio"])
    exclude = cfg["prune"]["exclude"]
    with distribution_strategy().scope():
        model, spec = load_model(model_dir)
    graph = filter_graph(model, exclude)
    ratios = plan_ratios(cfg, method, sparsity, graph.groups, sensitivity_dir)
    initial = {g.name: g.channels for g in graph.groups}
    weights_before, params_before = weights.prunable_weights(model), param_count(model)
    macs_before = count_macs(model)
    rng = np.random.default_rng(int(cfg["seed"]))

    for round_ in range(1, rounds + 1):
        if round_ > 1:
            graph = filter_graph(model, exclude)
        scores = channel_scores(graph, method, rng)
        keep, held = choose_kept(
            graph, scores, ratios, sparsity, initial, round_ / rounds, max_ratio
        )
        if held:
            say(f"round {round_}: {held} layer group(s) held at max_layer_ratio {max_ratio}")
        model = _rebuilt(graph, keep, method, spec["arch"])
        metrics = {
            "round": round_,
            "params": param_count(model),
            "macs": count_macs(model),
            "val_top1": val_top1(model, data, cfg),
        }
        say(
            f"round {round_}/{rounds}: {metrics['params']} params "
            f"({metrics['params'] / params_before:.1%}), {metrics['macs']} MACs "
            f"({metrics['macs'] / macs_before:.1%}), val top-1 {metrics['val_top1']:.4f}"
        )
        context.on_epoch(round_, metrics)
        if round_ < rounds and round_epochs > 0:
            recover(model, cfg, data, round_epochs)

    save_model(model, spec, Path(context.out_dir))
    return {
        "measured_sparsity": 1.0 - weights.prunable_weights(model) / weights_before,
        "val_top1": metrics["val_top1"],
        "params": metrics["params"],
        "params_before": params_before,
        "macs": metrics["macs"],
        "macs_before": macs_before,
        "layer_groups": len(initial),
    }
