"""`shrinkflow sensitivity` for TensorFlow: prune each layer group alone and measure what it costs.

The torch backend's twin. For every prunable layer group (``filter_groups.filter_graph``:
residual-coupled convolutions form one group and lose their filters together, exactly as the
prune stage would remove them) and every ratio of ``sensitivity.ratios``, the baseline loses
that share of the group's filters by L1 norm (``prune_structured.choose_kept``; the model is
rebuilt smaller, no fine-tuning), and its val top-1 is compared with the unpruned model's.

The caller's empty folder receives ``sensitivity.csv`` and ``sensitivity.png`` (see
``shrinkflow.sensitivity_report``) and ``ratios.json``: ``{group: ratio}`` for
``structured_sensitivity`` (read by ``structured_ratios.load_ratios``). A group's ratio is the
largest tested one up to which every tested ratio keeps the drop within
``sensitivity.max_drop`` (0.0 if even the smallest does not): robust layers are pruned more,
sensitive ones less, and one lucky large ratio after a failed smaller one cannot make a
sensitive layer look robust.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from itertools import product  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow.artifact import load_model, model_file  # noqa: E402
from shrinkflow.backends.tensorflow.filter_groups import filter_graph, l1_scores, shrink  # noqa: E402
from shrinkflow.backends.tensorflow.prune_structured import choose_kept, param_count  # noqa: E402
from shrinkflow.data.prepared import PreparedData, check_fits  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.metrics import topk_accuracy  # noqa: E402
from shrinkflow.outputs import write_json  # noqa: E402
from shrinkflow.progress import track  # noqa: E402
from shrinkflow.sensitivity_report import (  # noqa: E402
    CSV_FILE,
    PLOT_FILE,
    SensitivityRecord,
    plot,
    write_csv,
)
from shrinkflow.structured_ratios import RATIOS_FILE, robust_ratios  # noqa: E402

# Val images per forward pass: large batches amortise the per-call overhead, and a CIFAR val
# split (5,000 images of 32x32x3) holds under 100 MB as float32 whatever the batch.
_BATCH = 1000


def analyze_sensitivity(
    cfg: dict, model_dir: Path, data: PreparedData, out_dir: Path
) -> dict[str, float | int]:
    """Sweep every layer group of the model in ``model_dir`` over ``sensitivity.ratios``.

    Writes the three files above into ``out_dir`` (an existing empty folder owned by the
    caller) and returns ``groups`` (their number) and ``baseline_val_top1``.
    """
    ratios = sorted(float(r) for r in cfg["sensitivity"]["ratios"])
    for ratio in ratios:
        if not 0 < ratio < 1:
            raise ShrinkflowError(f"sensitivity.ratios: {ratio} is not in (0, 1)")
    if len(data.val) == 0:
        raise ShrinkflowError(
            "sensitivity: the prepared data has no validation images (raise data.val_fraction)"
        )
    baseline, spec = load_model(model_dir)
    check_fits(spec, data, model_file(model_dir))
    graph = filter_graph(baseline, cfg["prune"]["exclude"])
    if not graph.groups:
        raise ShrinkflowError(
            "prune.exclude: no layer group is left to prune (every group holds an excluded layer)"
        )
    batches, labels = _val_batches(data)
    baseline_top1 = _top1(baseline, batches, labels)
    baseline_params = param_count(baseline)
    scores = l1_scores(graph)
    initial = {g.name: g.channels for g in graph.groups}

    results = []
    pairs = list(product(graph.groups, ratios))
    for group, ratio in track(pairs, total=len(pairs), description="sensitivity"):
        alone = {name: ratio if name == group.name else 0.0 for name in initial}
        # max_ratio 1.0: the sweep may go past prune.structured.max_layer_ratio (never to 0).
        keep, _ = choose_kept(graph, scores, alone, 0.0, initial, 1.0, max_ratio=1.0)
        model = shrink(graph, keep)
        top1 = _top1(model, batches, labels)
        removed = baseline_params - param_count(model)
        members = " ".join(group.members)
        results.append(
            SensitivityRecord(group.name, members, ratio, top1, baseline_top1 - top1, removed)
        )

    out_dir = Path(out_dir)
    write_csv(results, out_dir / CSV_FILE)
    max_drop = float(cfg["sensitivity"]["max_drop"])
    plot(
        results,
        baseline_top1,
        max_drop,
        out_dir / PLOT_FILE,
        xlabel="share of the group's filters removed",
        title="Sensitivity of each layer group to filter pruning",
    )
    write_json(out_dir / RATIOS_FILE, robust_ratios(results, max_drop))
    return {"groups": len(graph.groups), "baseline_val_top1": baseline_top1}


def _val_batches(data: PreparedData) -> tuple[list[tf.Tensor], np.ndarray]:
    """The val pixels as float32 batches (converted once for the whole sweep), and labels."""
    index = np.asarray(data.val)
    batches = [
        tf.constant(data.images[index[i : i + _BATCH]], dtype=tf.float32)
        for i in range(0, len(index), _BATCH)
    ]
    return batches, data.labels[index]


def _top1(model: keras.Model, batches: list[tf.Tensor], labels: np.ndarray) -> float:
    """Val top-1 by direct calls: every swept model is new, so tracing one would not pay."""
    logits = np.concatenate([model(batch, training=False).numpy() for batch in batches])
    return topk_accuracy(logits, labels, (1,))[1]
