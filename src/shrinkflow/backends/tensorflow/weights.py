"""Which layers of a Keras model pruning acts on, and how many of their weights are zero.

Pruning acts on the kernels of ``Conv2D`` and ``Dense`` layers, as the torch backend's acts on
the weights of ``Conv2d`` and ``Linear``: biases and batch-norm parameters stay dense. A layer
wrapped by tfmot (``PruneLowMagnitude``, a ``keras.layers.Wrapper``) counts as the layer it
wraps, so a model in the middle of gradual pruning is measured like a plain one.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from collections.abc import Sequence  # noqa: E402
from fnmatch import fnmatchcase  # noqa: E402

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow.models import OUTPUT_LAYER  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402

PRUNABLE = (keras.layers.Conv2D, keras.layers.Dense)
OUTPUT = "output"  # the exclusion pattern standing for models.OUTPUT_LAYER, the logits layer
_LISTED = 8  # layer names quoted in an error message before the rest are only counted


def unwrap(layer: keras.layers.Layer) -> keras.layers.Layer:
    """The layer itself, or the layer a wrapper (tfmot's pruning wrapper) holds."""
    return layer.layer if isinstance(layer, keras.layers.Wrapper) else layer


def _conv_dense(model: keras.Model) -> list[keras.layers.Layer]:
    """Every Conv2D and Dense layer of ``model`` (wrappers included), in model order."""
    return [layer for layer in model.layers if isinstance(unwrap(layer), PRUNABLE)]


def resolve_exclude(model: keras.Model, patterns: Sequence[str]) -> list[str]:
    """The names of the Conv2D/Dense layers that match a pattern of ``prune.exclude``.

    Patterns are case-sensitive fnmatch patterns over Keras layer names (``layer1_*``,
    ``*_downsample_0``); ``output`` stands for the logits layer. A pattern matching no conv or
    dense layer is an error, because a typo would otherwise silently prune the layer it meant
    to protect.
    """
    names = [unwrap(layer).name for layer in _conv_dense(model)]
    resolved = []
    for pattern in patterns:
        pattern = OUTPUT_LAYER if pattern == OUTPUT else pattern
        if not any(fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:_LISTED])
            more = f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else ""
            raise ShrinkflowError(
                f"prune.exclude: {pattern!r} matches no conv or dense layer (layers: {shown}{more})"
            )
        resolved.append(pattern)
    return [n for n in names if any(fnmatchcase(n, p) for p in resolved)]


def prunable_layers(model: keras.Model, exclude: Sequence[str] = ()) -> list[keras.layers.Layer]:
    """The Conv2D and Dense layers (or their pruning wrappers) no ``exclude`` pattern matches.

    Patterns match the wrapped layer's name, not the wrapper's (``prune_low_magnitude_conv1``).
    """
    excluded = set(resolve_exclude(model, exclude))
    return [layer for layer in _conv_dense(model) if unwrap(layer).name not in excluded]


def kernel(layer: keras.layers.Layer) -> np.ndarray:
    """The kernel of a Conv2D or Dense layer (or of the layer a wrapper holds)."""
    return unwrap(layer).kernel.numpy()


def prunable_weights(model: keras.Model) -> int:
    """How many conv and dense kernel entries ``model`` has (the output layer included)."""
    return sum(int(np.prod(unwrap(layer).kernel.shape)) for layer in _conv_dense(model))


def zero_share(layers: Sequence[keras.layers.Layer]) -> float:
    """Share of zero entries over the kernels of ``layers``."""
    kernels = [kernel(layer) for layer in layers]
    total = sum(k.size for k in kernels)
    zeros = sum(k.size - int(np.count_nonzero(k)) for k in kernels)
    return zeros / total if total else 0.0


LayerCount = dict[str, int | str]  # one entry of layer_sparsity: layer, weights, nonzero
Counts = dict[str, int | float | list[LayerCount]]


def count_weights(
    values: Sequence[np.ndarray], kernels: Sequence[tuple[str, np.ndarray]]
) -> Counts:
    """``count_params``' figures from a model's parameter arrays and its named conv/dense
    kernels, for a Keras model and a ``.tflite`` file alike.

    Each kernel becomes one ``layer_sparsity`` entry (``layer``, ``weights``, ``nonzero``), in
    the order given, and the prunable totals are summed from those entries, so the per-layer
    list and the totals cannot disagree.
    """
    per_layer: list[LayerCount] = [
        {"layer": name, "weights": int(k.size), "nonzero": int(np.count_nonzero(k))}
        for name, k in kernels
    ]
    total = sum(int(entry["weights"]) for entry in per_layer)
    kept = sum(int(entry["nonzero"]) for entry in per_layer)
    return {
        "params": sum(int(v.size) for v in values),
        "nonzero_params": sum(int(np.count_nonzero(v)) for v in values),
        "prunable_weights": total,
        "prunable_nonzero": kept,
        "measured_sparsity": 1.0 - kept / total if total else 0.0,
        "layer_sparsity": per_layer,
    }


def count_params(model: keras.Model) -> Counts:
    """``params``, ``nonzero_params``, the conv/dense kernel counts (``prunable_weights``,
    ``prunable_nonzero``), ``measured_sparsity`` (the zero share of those kernels) and
    ``layer_sparsity``: those counts per layer, named as the Keras layers (a wrapped layer by
    its own name, not its wrapper's).

    ``params`` counts the trainable variables, as torch counts ``parameters()``: batch-norm
    moving statistics, the input normalisation's mean and variance and tfmot's masks are state
    (torch's buffers), not parameters. A variable keeps its ``trainable`` flag when its layer is
    frozen, so freezing a layer does not change the count.
    """
    values = [v.numpy() for v in model.weights if v.trainable]
    kernels = [(unwrap(layer).name, kernel(layer)) for layer in _conv_dense(model)]
    return count_weights(values, kernels)
