"""`shrinkflow sensitivity` for PyTorch: prune each layer group alone and measure what it costs.

For every prunable layer group (``prune_structured.layer_groups``: residual-coupled
convolutions form one group and lose their filters together, exactly as the prune stage would
remove them) and every ratio of ``sensitivity.ratios``, a fresh copy of the baseline loses that
share of the group's filters by L1 norm, with no fine-tuning, and its val top-1 is compared
with the unpruned model's.

The caller's empty folder receives:
- ``sensitivity.csv``: group, members, ratio, val_top1, drop, params_removed;
- ``sensitivity.png``: val top-1 against ratio, one line per group;
- ``ratios.json``: ``{group: ratio}`` for ``structured_sensitivity``. A group's ratio is the
  largest tested one up to which every tested ratio keeps the drop within
  ``sensitivity.max_drop`` (0.0 if even the smallest does not): robust layers are pruned
  more, sensitive ones less, and one lucky large ratio after a failed smaller one cannot
  make a sensitive layer look robust.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from matplotlib.figure import Figure

from shrinkflow.backends.torch.artifact import load_model
from shrinkflow.backends.torch.prune_structured import (
    LayerGroup,
    build_pruner,
    example_input,
    ignored_layers,
    importance,
    layer_groups,
    param_count,
    prune_step,
    val_top1,
)
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.backends.torch.train import resolve_device
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import write_json
from shrinkflow.progress import track

CSV_FILE, PLOT_FILE, RATIOS_FILE = "sensitivity.csv", "sensitivity.png", "ratios.json"
_LEGEND_ROWS = 24  # legend entries per column before the legend wraps into another column
_LINE_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class _Result:
    group: LayerGroup
    ratio: float
    val_top1: float
    drop: float  # baseline val top-1 minus val_top1: positive is worse
    params_removed: int


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
    groups = layer_groups(baseline, example, ignored_layers(baseline, exclude))
    x_val, y_val = to_device_tensors(data, "val", dev)
    baseline_top1 = val_top1(baseline, x_val, y_val)
    baseline_params = param_count(baseline)

    results = []
    pairs = list(product(groups, ratios))
    for group, ratio in track(pairs, total=len(pairs), description="sensitivity"):
        model = copy.deepcopy(baseline)
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
        results.append(
            _Result(group, ratio, top1, baseline_top1 - top1, baseline_params - param_count(model))
        )

    out_dir = Path(out_dir)
    _write_csv(results, out_dir / CSV_FILE)
    max_drop = float(cfg["sensitivity"]["max_drop"])
    _plot(results, baseline_top1, max_drop, out_dir / PLOT_FILE)
    write_json(out_dir / RATIOS_FILE, _robust_ratios(results, max_drop))
    return {"groups": len(groups), "baseline_val_top1": baseline_top1}


def load_ratios(sensitivity_dir: Path) -> dict[str, float]:
    """The per-group ratios a sensitivity run wrote to ``sensitivity_dir/ratios.json``."""
    path = Path(sensitivity_dir) / RATIOS_FILE
    try:
        ratios = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShrinkflowError(f"{path}: not found (run shrinkflow sensitivity first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShrinkflowError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(ratios, dict) or not all(
        isinstance(r, int | float) and not isinstance(r, bool) and 0 <= r < 1
        for r in ratios.values()
    ):
        raise ShrinkflowError(f"{path}: expected an object of layer group -> ratio in [0, 1)")
    return {str(name): float(r) for name, r in ratios.items()}


def _robust_ratios(results: list[_Result], max_drop: float) -> dict[str, float]:
    chosen: dict[str, float] = {}
    failed: set[str] = set()
    for r in sorted(results, key=lambda r: r.ratio):
        name = r.group.name
        chosen.setdefault(name, 0.0)
        # The tolerance keeps a drop of exactly max_drop (say 100 of 5000 images at 0.02) from
        # failing by float round-off; NaN never passes.
        if name in failed or not r.drop <= max_drop + 1e-9:
            failed.add(name)
        else:
            chosen[name] = r.ratio
    return chosen


def _write_csv(results: list[_Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "members", "ratio", "val_top1", "drop", "params_removed"])
        for r in results:
            members = " ".join(r.group.members)
            writer.writerow([r.group.name, members, r.ratio, r.val_top1, r.drop, r.params_removed])


def _plot(results: list[_Result], baseline_top1: float, max_drop: float, path: Path) -> None:
    by_group: dict[LayerGroup, list[_Result]] = {}
    for r in results:
        by_group.setdefault(r.group, []).append(r)
    columns = math.ceil((len(by_group) + 1) / _LEGEND_ROWS)
    # A bare Figure (no pyplot) renders PNG with Agg: no display needed, no global figure state.
    fig = Figure(figsize=(7 + 2.5 * columns, 5))
    ax = fig.subplots()
    for i, (group, rows) in enumerate(by_group.items()):
        coupled = f" (+{len(group.members) - 1} coupled)" if len(group.members) > 1 else ""
        ax.plot(
            [0.0] + [r.ratio for r in rows],
            [baseline_top1] + [r.val_top1 for r in rows],
            marker="o",
            markersize=3,
            # The colour cycle has 10 colours; the line style tells groups 10 apart.
            linestyle=_LINE_STYLES[i // 10 % len(_LINE_STYLES)],
            label=f"{group.name}{coupled}",
        )
    ax.axhline(
        baseline_top1 - max_drop,
        color="grey",
        linewidth=0.8,
        linestyle="--",
        label=f"baseline - max_drop ({max_drop:g})",
    )
    ax.set_xlabel("share of the group's filters removed")
    ax.set_ylabel("val top-1 (no fine-tuning)")
    ax.set_title("Sensitivity of each layer group to filter pruning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=columns, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
