"""The files of `shrinkflow sensitivity`, whichever backend measured the sweep (no framework).

Each backend prunes every layer (group) alone at each of ``sensitivity.ratios`` and hands the
measurements here as ``SensitivityRecord``s:

- ``sensitivity.csv``: group, members, ratio, val_top1, drop, params_removed;
- ``sensitivity.png``: val top-1 against ratio, one line per group, with the
  ``baseline - sensitivity.max_drop`` line.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from matplotlib.figure import Figure

CSV_FILE, PLOT_FILE = "sensitivity.csv", "sensitivity.png"
_LEGEND_ROWS = 24  # legend entries per column before the legend wraps into another column
_LINE_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class SensitivityRecord:
    """One group pruned alone to one ratio; the fields are the CSV's columns, in order."""

    group: str  # the group's name (its first layer)
    members: str  # the layers pruned together, space-separated (just ``group`` when alone)
    ratio: float
    val_top1: float
    drop: float  # baseline val top-1 minus val_top1: positive is worse
    params_removed: int


def write_csv(records: Sequence[SensitivityRecord], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([field.name for field in fields(SensitivityRecord)])
        writer.writerows(astuple(r) for r in records)


def plot(
    records: Sequence[SensitivityRecord],
    baseline_top1: float,
    max_drop: float,
    path: Path,
    *,
    xlabel: str,
    title: str,
) -> None:
    """Val top-1 against ratio, one line per group, each starting at the baseline (ratio 0)."""
    by_group: dict[str, list[SensitivityRecord]] = {}
    for r in records:
        by_group.setdefault(r.group, []).append(r)
    columns = math.ceil((len(by_group) + 1) / _LEGEND_ROWS)
    # A bare Figure (no pyplot) renders PNG with Agg: no display needed, no global figure state.
    fig = Figure(figsize=(7 + 2.5 * columns, 5))
    ax = fig.subplots()
    for i, (group, rows) in enumerate(by_group.items()):
        coupled = len(rows[0].members.split()) - 1
        ax.plot(
            [0.0] + [r.ratio for r in rows],
            [baseline_top1] + [r.val_top1 for r in rows],
            marker="o",
            markersize=3,
            # The colour cycle has 10 colours; the line style tells groups 10 apart.
            linestyle=_LINE_STYLES[i // 10 % len(_LINE_STYLES)],
            label=f"{group} (+{coupled} coupled)" if coupled else group,
        )
    ax.axhline(
        baseline_top1 - max_drop,
        color="grey",
        linewidth=0.8,
        linestyle="--",
        label=f"baseline - max_drop ({max_drop:g})",
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val top-1 (no fine-tuning)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=columns, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
