"""`shrinkflow sensitivity` for PyTorch: prune each layer group alone and measure what it costs.

For every prunable layer group (``prune_structured.layer_groups``: residual-coupled
convolutions form one group and lose their filters together, exactly as the prune stage would
remove them) and every ratio of ``sensitivity.ratios``, a fresh copy of the baseline loses that
share of the group's filters by L1 norm, with no fine-tuning, and its val top-1 is compared
with the unpruned model's.

The caller's empty folder receives ``sensitivity.csv`` and ``sensitivity.png`` (see
``shrinkflow.sensitivity_report``) and ``ratios.json``: ``{group: ratio}`` for
``structured_sensitivity`` (read by ``prune_structured.load_ratios``). A group's ratio is the
largest tested one up to which every tested ratio keeps the drop within
``sensitivity.max_drop`` (0.0 if even the smallest does not): robust layers are pruned more,
sensitive ones less, and one lucky large ratio after a failed smaller one cannot make a
sensitive layer look robust.
"""

from __future__ import annotations

import copy
from itertools import product
from pathlib import Path

from shrinkflow.backends.torch.artifact import load_model
from shrinkflow.backends.torch.device import resolve_device
from shrinkflow.backends.torch.prune_structured import (
    build_pruner,
    example_input,
    ignored_layers,
    importance,
    layer_groups,
    param_count,
    prune_step,
    torch_pruning_errors,
    val_top1,
)
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import write_json
from shrinkflow.progress import track
from shrinkflow.sensitivity_report import CSV_FILE, PLOT_FILE, SensitivityRecord, plot, write_csv
from shrinkflow.structured_ratios import RATIOS_FILE, robust_ratios


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
    exclude = cfg["prune"]["exclude"]
    dev = resolve_device("auto")
    baseline, spec = load_model(model_dir, dev)
    example = example_input(spec, dev)
    with torch_pruning_errors("sensitivity", spec["arch"], "tracing it"):
        groups = layer_groups(baseline, example, ignored_layers(baseline, exclude))
    x_val, y_val = to_device_tensors(data, "val", dev)
    baseline_top1 = val_top1(baseline, x_val, y_val)
    baseline_params = param_count(baseline)

    results = []
    pairs = list(product(groups, ratios))
    for group, ratio in track(pairs, total=len(pairs), description="sensitivity"):
        model = copy.deepcopy(baseline)
        with torch_pruning_errors("sensitivity", spec["arch"], f"pruning {group.name}"):
            pruner = build_pruner(
                model,
                example,
                importance("structured_l1", cfg["seed"]),
                {group.name: ratio},
                0.0,  # every other group keeps all its filters
                ignored_layers(model, exclude),
                rounds=1,
                max_ratio=1.0,  # the sweep may go past prune.structured.max_layer_ratio
            )
            prune_step(pruner, max_ratio=1.0)
            top1 = val_top1(model, x_val, y_val)
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
    return {"groups": len(groups), "baseline_val_top1": baseline_top1}
