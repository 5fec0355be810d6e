"""Which artefact to ship: the smallest within the accuracy budget, and the fastest if another.

Every decision is made on validation accuracy (mean over the training seeds): the budget, the
order of equal sizes, the Pareto front. Test accuracy is reported beside it and decides nothing,
so the reported test figure is an unbiased estimate of the chosen model. The budget is measured
per backend x model, from the baseline the artefact descends from, so a quantized ResNet-20 is
held to ResNet-20's accuracy. The baseline itself is always within budget, so there is always a
choice; the reason says what it buys, what it costs, and the interval of that cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

SIZE_WORDS = {"gzip_bytes": "gzip bytes", "size_bytes": "bytes"}
DECIDING_SPLIT = "validation"  # the split every decision is made on; test is only reported


@dataclass(frozen=True)
class Choice:
    role: str  # "smallest" or "fastest"
    label: str  # the node's folder under results/models, e.g. torch/resnet20/baseline
    reason: str  # what it buys and what it costs, in a sentence or two


@dataclass(frozen=True)
class Selection:
    max_drop: float  # report.max_accuracy_drop, a fraction of top-1
    size_metric: str  # report.size_metric: gzip_bytes | size_bytes
    champion: Choice  # the smallest artefact within budget
    fastest: Choice | None  # the fastest within budget; None when it is the champion
    per_model: list[Choice]  # the smallest within budget for each backend x model
    eligible: int  # rows within budget
    total: int  # rows in the summary

    @property
    def quickest(self) -> Choice:
        """The fastest within budget, whether or not it is also the champion."""
        return self.fastest or self.champion


def select(df: pd.DataFrame, max_drop: float, size_metric: str) -> Selection:
    """Choose from a table annotated by ``table.annotate``."""
    within = df[df["eligible"]]
    smallest = _smallest(within)
    quickest = within.sort_values(
        ["latency_ms_b1", "size", "val_top1"], ascending=[True, True, False], kind="stable"
    ).iloc[0]
    per_model = [
        Choice("smallest", row.label, _smallest_reason(row, rows, df, max_drop, size_metric))
        for (_, _), rows in within.groupby(["backend", "model"], sort=False)
        for row in [_smallest(rows)]
    ]
    fastest = None
    if quickest.label != smallest.label:
        fastest = Choice(
            "fastest", quickest.label, _fastest_reason(quickest, smallest, df, size_metric)
        )
    return Selection(
        max_drop=max_drop,
        size_metric=size_metric,
        champion=Choice(
            "smallest",
            smallest.label,
            _smallest_reason(smallest, within, df, max_drop, size_metric),
        ),
        fastest=fastest,
        per_model=per_model,
        eligible=len(within),
        total=len(df),
    )


def _smallest(rows: pd.DataFrame) -> pd.Series:
    """Smallest first; equal sizes go to the more accurate on validation, then the faster."""
    ordered = rows.sort_values(
        ["size", "val_top1", "latency_ms_b1"], ascending=[True, False, True], kind="stable"
    )
    return ordered.iloc[0]


def _baseline(df: pd.DataFrame, row: pd.Series) -> pd.Series:
    found = df[(df["backend"] == row.backend) & (df["model"] == row.model)]
    return found[found["stage"] == "baseline"].iloc[0]


def points(drop: float) -> str:
    """A top-1 change in percentage points, signed from the user's side: -0.80 is worse than
    the baseline. ``+ 0.0`` turns a rounded -0.00 into +0.00."""
    return f"{round(-drop * 100, 2) + 0.0:+.2f}"


def accuracy_words(row: pd.Series) -> str:
    """A node's validation top-1 (what decided) with its interval, and its test top-1."""
    return (
        f"validation top-1 {row.val_top1:.4f} [{row.val_top1_low:.4f}, {row.val_top1_high:.4f}], "
        f"test top-1 {row.top1:.4f} [{row.top1_low:.4f}, {row.top1_high:.4f}]"
    )


def drop_words(row: pd.Series) -> str:
    """The validation drop from the baseline, its interval, and whether it is within noise."""
    verdict = "within noise" if row.within_noise else "beyond noise"
    return (
        f"{points(row['drop'])} pt on validation [{points(row.drop_high)}, "
        f"{points(row.drop_low)}], {verdict}"
    )


def _smallest_reason(
    row: pd.Series, within: pd.DataFrame, df: pd.DataFrame, max_drop: float, size_metric: str
) -> str:
    base = _baseline(df, row)
    unit = SIZE_WORDS[size_metric]
    budget = f"{max_drop * 100:g} pt"
    if row.label == base.label:
        return (
            f"No pruned or quantized artefact of {row.backend}/{row.model} stayed within "
            f"{budget} of its baseline's mean validation top-1 {base.val_top1:.4f}, so the "
            f"baseline is kept ({int(row['size']):,} {unit}; {accuracy_words(row)}; "
            f"{row.interval})."
        )
    others = within[within["label"] != row.label].sort_values("size", kind="stable")
    runner_up = (
        f" The next smallest within budget is {others.iloc[0].label} "
        f"({int(others.iloc[0]['size']):,} {unit}, validation top-1 "
        f"{others.iloc[0].val_top1:.4f})."
        if not others.empty
        else ""
    )
    return (
        f"The smallest of {len(within)} artefacts whose mean validation top-1 is within {budget} "
        f"of their baseline: {int(row['size']):,} {unit}, {base['size'] / row['size']:.1f}x "
        f"smaller than {row.backend}/{row.model}'s baseline ({int(base['size']):,}); "
        f"{accuracy_words(row)}; {drop_words(row)} ({row.interval}); "
        f"{row.latency_ms_b1:.2f} ms per image at batch 1 against the baseline's "
        f"{base.latency_ms_b1:.2f} ms.{runner_up}"
    )


def speed_words(row: pd.Series) -> str:
    """The batch-1 speed-up against the float model of the same runtime, and the
    cross-runtime ratio to the baseline where the runtimes differ, labelled as such."""
    if row.stage == "quantized" and not pd.isna(row.speedup_b1):
        text = (
            f"{row.speedup:.2f}x the speed of its float source in the same runtime "
            f"({row.runtime}, {row.float_latency_ms_b1:.2f} ms, timed side by side)"
        )
    else:
        text = f"{row.speedup:.2f}x the speed of the baseline ({row.runtime})"
    if row.cross_runtime:
        text += (
            f"; {row.baseline_speedup:.2f}x the baseline's speed across runtimes "
            f"({row.runtime} against the baseline's), which is not what compression bought"
        )
    return text


def _fastest_reason(row: pd.Series, smallest: pd.Series, df: pd.DataFrame, size_metric: str) -> str:
    return (
        f"The fastest within budget: {row.latency_ms_b1:.2f} ms per image at batch 1, "
        f"{speed_words(row)}; {accuracy_words(row)}; {drop_words(row)}; "
        f"{int(row['size']):,} {SIZE_WORDS[size_metric]}; the smallest, {smallest.label}, "
        f"takes {smallest.latency_ms_b1:.2f} ms."
    )
