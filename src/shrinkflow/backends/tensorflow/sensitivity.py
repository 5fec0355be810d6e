"""`shrinkflow sensitivity` for TensorFlow: prune each layer alone and measure what it costs.

shrinkflow has no structured (filter-removing) pruning for TensorFlow, so the sweep is the
classic unstructured one: every prunable Conv2D and Dense layer (``weights.prunable_layers``:
all but the ``prune.exclude`` matches, ``output`` being the logits layer) is pruned alone to
each ratio of ``sensitivity.ratios`` by the prune stage's own rule (``prune.magnitude_prune``
with scope ``layer``: that share of the layer's smallest |w| set to zero), the rest of the
model untouched and no fine-tuning, and its val top-1 is compared with the unpruned model's.

The caller's empty folder receives ``sensitivity.csv`` and ``sensitivity.png`` (see
``shrinkflow.sensitivity_report``), with one group per layer: ``members`` is the layer alone
and ``params_removed`` the kernel entries zeroed. There is no ``ratios.json``: on torch it
feeds ``structured_sensitivity``, a filter-pruning method this backend does not have, so
nothing would read it.

One model serves the whole sweep: each pruned kernel is assigned in place, scored with one
traced forward pass over the val split, and the original kernel assigned back.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from collections.abc import Callable  # noqa: E402
from itertools import product  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow.artifact import load_model, model_file  # noqa: E402
from shrinkflow.backends.tensorflow.prune import magnitude_prune, pruned_layers  # noqa: E402
from shrinkflow.data.prepared import PreparedData, check_fits  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.metrics import topk_accuracy  # noqa: E402
from shrinkflow.progress import track  # noqa: E402
from shrinkflow.sensitivity_report import (  # noqa: E402
    CSV_FILE,
    PLOT_FILE,
    SensitivityRecord,
    plot,
    write_csv,
)

# Val images per forward pass: large batches amortise the per-call overhead, and a CIFAR val
# split (5,000 images of 32x32x3) holds under 100 MB as float32 whatever the batch.
_BATCH = 1000


def analyze_sensitivity(
    cfg: dict, model_dir: Path, data: PreparedData, out_dir: Path
) -> dict[str, float | int]:
    """Sweep every prunable layer of the model in ``model_dir`` over ``sensitivity.ratios``.

    Writes the two files above into ``out_dir`` (an existing empty folder owned by the
    caller) and returns ``groups`` (the layers swept) and ``baseline_val_top1``.
    """
    ratios = sorted(float(r) for r in cfg["sensitivity"]["ratios"])
    for ratio in ratios:
        if not 0 < ratio < 1:
            raise ShrinkflowError(f"sensitivity.ratios: {ratio} is not in (0, 1)")
    if len(data.val) == 0:
        raise ShrinkflowError(
            "sensitivity: the prepared data has no validation images (raise data.val_fraction)"
        )
    model, spec = load_model(model_dir)
    check_fits(spec, data, model_file(model_dir))
    layers = pruned_layers(model, cfg["prune"]["exclude"])
    val_top1 = _scorer(model, data)
    baseline_top1 = val_top1()

    results = []
    originals = {layer.name: layer.kernel.numpy() for layer in layers}
    pairs = list(product(layers, ratios))
    for layer, ratio in track(pairs, total=len(pairs), description="sensitivity"):
        original = originals[layer.name]
        pruned = magnitude_prune([original], ratio, "layer")[0]
        layer.kernel.assign(pruned)
        try:
            top1 = val_top1()
        finally:
            layer.kernel.assign(original)
        removed = int(np.count_nonzero(original)) - int(np.count_nonzero(pruned))
        results.append(
            SensitivityRecord(layer.name, layer.name, ratio, top1, baseline_top1 - top1, removed)
        )

    out_dir = Path(out_dir)
    write_csv(results, out_dir / CSV_FILE)
    plot(
        results,
        baseline_top1,
        float(cfg["sensitivity"]["max_drop"]),
        out_dir / PLOT_FILE,
        xlabel="share of the layer's weights zeroed (smallest |w|)",
        title="Sensitivity of each layer to magnitude pruning",
    )
    return {"groups": len(layers), "baseline_val_top1": baseline_top1}


def _scorer(model: keras.Model, data: PreparedData) -> Callable[[], float]:
    """A function returning ``model``'s val top-1 with the weights it holds when called.

    The val pixels are converted once, and the forward pass is traced once (one input
    signature for every batch size): the model's variables are read at each call, so a kernel
    assigned in between is what the next score sees.
    """
    index = np.asarray(data.val)
    labels = data.labels[index]
    batches = [
        tf.constant(data.images[index[i : i + _BATCH]], dtype=tf.float32)
        for i in range(0, len(index), _BATCH)
    ]
    forward = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec((None, *data.images.shape[1:]), tf.float32)],
    )

    def val_top1() -> float:
        logits = np.concatenate([forward(batch).numpy() for batch in batches])
        return topk_accuracy(logits, labels, (1,))[1]

    return val_top1
