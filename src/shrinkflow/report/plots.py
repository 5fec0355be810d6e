"""The report's figures: one function per PNG, each drawn on a bare matplotlib ``Figure``.

No pyplot: a bare Figure renders with Agg, needs no display and keeps no global state. Sizes and
fonts are chosen so a full sweep (2 backends x 3 models x 6 methods x 20 sparsities x 4
quantization methods) stays readable and every PNG stays well under 150 KB, because index.html
embeds them all.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    EngFormatter,
    LogLocator,
    NullFormatter,
    PercentFormatter,
    StrMethodFormatter,
)
from PIL import Image

from shrinkflow.errors import ShrinkflowError
from shrinkflow.report import noise, published
from shrinkflow.report.selection import SIZE_WORDS, Selection
from shrinkflow.report.table import pareto_mask

DPI = 120  # as sensitivity.png: sharp on screen, small files
_NAMED = 3  # the most sensitive groups named in each sensitivity panel
_LABEL_POINTS = 6  # font size of the labels drawn beside lines (budget edges, sensitive groups)
_LABEL_GAP = 1.35  # their line spacing, in font sizes: labels closer than this are spread
_CHOSEN = "crimson"  # the ring and tag of a chosen artefact
_LINE_STYLES = ("-", "--", ":", "-.")
_QUANT_MARKERS = ("s", "^", "v", "D", "P", "X", "<", ">", "h", "p")
_FLOAT_MARKERS = {"baseline": "*", "finetuned": "o", "pruned": "x"}
_FLOAT_NAMES = {"baseline": "baseline", "finetuned": "fine-tuned", "pruned": "pruned"}
_LOG_SPAN = 10.0  # a value range wider than this factor gets a log axis
_FADED = 0.3  # alpha of points outside the accuracy budget
# Published results: hollow, in a colour no backend or method line takes, one marker per source.
_REFERENCE_COLOUR = "saddlebrown"
_REFERENCE_MARKERS = ("H", "d", "8", "p")
_ON_SPARSITY_AXIS = ("dense", "unstructured", "int8")  # kinds placed by weight sparsity
# Columns each figure reads from table.annotate's seed-aggregated rows.
_SPARSITY_COLUMNS = (
    *("backend", "model", "stage", "prune_method", "target_sparsity", "quant_method"),
    *("top1", "top1_low", "top1_high", "baseline_top1", "seeds", "test_images"),
)
_TRADEOFF_COLUMNS = (
    *("backend", "model", "stage", "quant_method", "label", "eligible", "pareto"),
    *("val_top1", "val_top1_low", "val_top1_high", "baseline_val_top1", "interval"),
)
# Colour by depth: viridis without its last, pale yellows, which vanish on white.
_DEPTH = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.85, 256)))


def accuracy_vs_sparsity(df: pd.DataFrame, max_drop: float, path: Path, *, dataset: str) -> None:
    """Test top-1 (mean over seeds, bars: its interval) against target sparsity, one panel per
    backend x model (rows: models, columns: backends, shared y): one line per prune method
    through its fine-tuned points, starting at the baseline (sparsity 0); ``pruned`` rows (before
    fine-tuning), if any, dotted; quantized artefacts as light markers, one shape per quantization
    method; dashed: the test baseline minus ``max_drop``, a guide only (the budget is decided on
    validation top-1).

    Test top-1 is drawn because it is what a reader quotes and what papers publish: the
    published dense and unstructured results for the panel's model on ``dataset`` (params.yaml
    ``data.name``; see published.py) are drawn at their sparsity, named by their source.
    Structured references have no place here: they give a MACs reduction, and the x axis is a
    share of weights (or, for structured methods, of filters)."""
    _require(df, _SPARSITY_COLUMNS, "accuracy_vs_sparsity")
    backends, models = _unique(df["backend"]), _unique(df["model"])
    floats = df[df["stage"].isin(["finetuned", "pruned"])]
    methods = _unique(floats["prune_method"])
    qmethods = _unique(df.loc[df["stage"] == "quantized", "quant_method"])
    references = {
        model: [r for r in published.points(dataset, model) if r.kind in _ON_SPARSITY_AXIS]
        for model in models
    }
    sources = _unique(r.source for refs in references.values() for r in refs)
    markers = {s: _REFERENCE_MARKERS[k % len(_REFERENCE_MARKERS)] for k, s in enumerate(sources)}
    fig = Figure(figsize=(1.5 + 4.0 * len(backends), 0.6 + 2.9 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), len(backends), sharex=True, sharey=True, squeeze=False)
    for (r, model), (c, backend) in _grid(models, backends):
        ax = axes[r][c]
        rows = df[(df["backend"] == backend) & (df["model"] == model)]
        if rows.empty:
            ax.set_axis_off()
            continue
        baseline = rows[rows["stage"] == "baseline"]
        for i, method in enumerate(methods):
            for stage, style in (("finetuned", _method_style(i)), ("pruned", ":")):
                points = rows[(rows["stage"] == stage) & (rows["prune_method"] == method)]
                if points.empty:
                    continue
                line = pd.concat([baseline, points.sort_values("target_sparsity", kind="stable")])
                ax.errorbar(
                    line["target_sparsity"].fillna(0.0),
                    line["top1"],
                    yerr=_yerr(line, "top1"),
                    color=_colour(i),
                    linestyle=style,
                    marker=_FLOAT_MARKERS[stage],
                    markersize=3,
                    linewidth=1.2,
                    elinewidth=0.7,
                    capsize=1.5,
                )
        quantized = rows[rows["stage"] == "quantized"]
        for j, qmethod in enumerate(qmethods):
            points = quantized[quantized["quant_method"] == qmethod]
            x = points["target_sparsity"].fillna(0.0)
            ax.errorbar(
                x,
                points["top1"],
                yerr=_yerr(points, "top1"),
                fmt="none",
                ecolor="grey",
                elinewidth=0.6,
                alpha=0.45,
            )
            ax.scatter(
                x,
                points["top1"],
                # Quantized baselines have no prune method: black, like the baseline star.
                c=[_method_colour(m, methods) for m in points["prune_method"]],
                marker=_QUANT_MARKERS[j % len(_QUANT_MARKERS)],
                s=14,
                alpha=0.45,
                linewidths=0,
            )
        ax.errorbar(
            [0.0] * len(baseline),
            baseline["top1"],
            yerr=_yerr(baseline, "top1"),
            marker="*",
            markersize=9,
            color="black",
            linestyle="none",
            elinewidth=0.8,
            capsize=2,
        )
        _draw_references(ax, references[model], markers)
        ax.axhline(
            float(rows["baseline_top1"].iloc[0]) - max_drop,
            color="grey",
            linewidth=0.8,
            linestyle="--",
        )
        _panel(
            ax,
            f"{backend}/{model}",
            r == len(models) - 1,
            c == 0,
            "target sparsity",
            "test top-1 (mean over seeds)",
        )
    handles = [_line(_colour(i), method, _method_style(i)) for i, method in enumerate(methods)]
    if (floats["stage"] == "pruned").any():
        handles.append(_line("grey", "before fine-tuning", ":", marker="x"))
    handles.append(_line("black", "baseline", "none", marker="*"))
    handles += [
        _line("grey", f"quantized: {q}", "none", marker=_QUANT_MARKERS[j % len(_QUANT_MARKERS)])
        for j, q in enumerate(qmethods)
    ]
    handles.append(_line("grey", f"test baseline - {max_drop * 100:g} pt", "--"))
    handles += [
        _line(_REFERENCE_COLOUR, f"published: {source}", "none", marker=marker, hollow=True)
        for source, marker in markers.items()
    ]
    # The table's ``interval`` names the validation split's; these bars are the test split's.
    test_interval = noise.describe(int(df["seeds"].iloc[0]), int(df["test_images"].iloc[0]), "test")
    handles.append(_bars_entry(test_interval))
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, frameon=False)
    _save(fig, path)


def _draw_references(
    ax: Axes, references: Sequence[published.Reference], markers: Mapping[str, str]
) -> None:
    """Published results as hollow markers: dense ones at sparsity 0, unstructured ones at
    their sparsity, joined by a thin dotted line to the source's own dense top-1 (so its drop
    reads against its baseline, not against this run's)."""
    for ref in references:
        marker = markers[ref.source]
        x = ref.sparsity or 0.0
        if ref.baseline_top1 is not None and x > 0:
            ax.plot(
                [0.0, x],
                [ref.baseline_top1, ref.top1],
                color=_REFERENCE_COLOUR,
                linestyle=":",
                linewidth=0.8,
                marker=marker,
                markersize=5,
                markerfacecolor="none",
                gid=f"published: {ref.source}",
            )
        ax.plot(
            [x],
            [ref.top1],
            color=_REFERENCE_COLOUR,
            linestyle="none",
            marker=marker,
            markersize=7,
            markerfacecolor="none",
            markeredgewidth=1.2,
            gid=f"published: {ref.source}",
        )


def size_vs_accuracy(df: pd.DataFrame, selection: Selection, path: Path) -> None:
    """Size (the ``size`` column, log x when it spans a decade) against validation top-1."""
    _tradeoff(
        df,
        selection,
        "size",
        f"{SIZE_WORDS[selection.size_metric]} (deployed file)",
        EngFormatter(unit="B", sep=" "),
        path,
    )


def latency_vs_accuracy(df: pd.DataFrame, selection: Selection, path: Path) -> None:
    """Latency per image at batch 1 against validation top-1 for every row that has one."""
    _tradeoff(
        df,
        selection,
        "latency_ms_b1",
        "ms per image at batch 1",
        StrMethodFormatter("{x:g}"),
        path,
    )


def _tradeoff(
    df: pd.DataFrame, selection: Selection, column: str, xlabel: str, formatter, path: Path
) -> None:
    """One axes, all rows: validation top-1 (the split the choice is made on; mean over seeds,
    bars: its interval) against ``column``; colour per backend, marker per stage (float) or
    quantization method, faded outside the accuracy budget; the Pareto front as a step line;
    each backend x model's budget (validation baseline - max_drop) as a dotted line; the chosen
    artefacts ringed and named.

    No published references here: papers give test top-1, not validation top-1, and neither
    file sizes nor latencies on this machine."""
    _require(df, (*_TRADEOFF_COLUMNS, column), f"the {column} trade-off plot")
    fig = Figure(figsize=(9.5, 5.2), layout="constrained")
    ax = fig.subplots()
    data = df[np.isfinite(df[column]) & (df[column] > 0)]
    if data.empty:
        ax.text(0.5, 0.5, f"no {xlabel} measured", ha="center", va="center")
        ax.set_axis_off()
        _save(fig, path)
        return
    backends = _unique(data["backend"])
    names, styles = _styles(data)
    data = data.assign(_style=names)
    for (backend, style), rows in data.groupby(["backend", "_style"], sort=False):
        for eligible, alpha in ((True, 0.9), (False, _FADED)):
            part = rows[rows["eligible"] == eligible]
            if part.empty:
                continue
            ax.errorbar(
                part[column],
                part["val_top1"],
                yerr=_yerr(part, "val_top1"),
                color=_colour(backends.index(backend)),
                marker=styles[style],
                markersize=7.7 if style == "baseline" else 4.7,  # as scatter's s=60 and s=22
                markeredgewidth=0,
                linestyle="none",
                elinewidth=0.7,
                alpha=alpha,
            )
    # The size plot's front is the table's (``pareto``: size against validation top-1); the
    # latency plot needs its own, over latency.
    on_front = (
        data["pareto"].to_numpy(bool)
        if column == "size"
        else pareto_mask(data[column].to_numpy(), data["val_top1"].to_numpy())
    )
    front = data[on_front].sort_values(column, kind="stable")
    # steps-post: the best validation top-1 reachable at or below each x.
    ax.plot(front[column], front["val_top1"], drawstyle="steps-post", color="black", linewidth=0.9)
    chosen = _mark_chosen(ax, data, selection, column)
    values = data[column].to_numpy()
    if values.max() / values.min() >= _LOG_SPAN:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(formatter)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("validation top-1 (mean over seeds; the choice is made on it)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    handles = [_line(_colour(i), b, "none", marker="o") for i, b in enumerate(backends)]
    handles += [_line("grey", name, "none", marker=marker) for name, marker in styles.items()]
    handles += [
        _line("black", "Pareto front", "-"),
        _line("grey", f"validation baseline - {selection.max_drop * 100:g} pt", ":"),
        _line("grey", "outside budget (faded)", "none", marker="o", alpha=_FADED),
        _bars_entry(df["interval"].iloc[0]),
        *chosen,
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, frameon=False)
    _budget_lines(ax, data, selection.max_drop)  # last: its labels are placed on the final layout
    _save(fig, path)


def _require(df: pd.DataFrame, columns: Iterable[str], figure: str) -> None:
    """Fail on a table without the seed-aggregated columns of ``table.annotate`` (e.g. one read
    from an old summary) rather than draw without the noise."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ShrinkflowError(
            f"{figure}: the report table has no column(s) {', '.join(missing)}; the figures "
            "are drawn from table.annotate's rows (an old summary? run `shrinkflow summarize`)"
        )


def _yerr(rows: pd.DataFrame, column: str) -> np.ndarray:
    """Error bar lengths (below, above) from ``column``'s ``_low`` and ``_high`` columns."""
    centre = rows[column].to_numpy(float)
    spans = np.vstack(
        [centre - rows[f"{column}_low"].to_numpy(float), rows[f"{column}_high"].to_numpy(float)]
    )
    spans[1] -= centre
    # A mean on its interval's edge can come out a rounding error outside it.
    return np.clip(spans, 0.0, None)


def _bars_entry(interval: str) -> Line2D:
    """The legend entry that says what the error bars are (e.g. the table's ``interval``)."""
    return _line("grey", f"bars: {interval}", "none", marker="|")


def _styles(data: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """Each row's style name (its stage if float, else its quant method) and the marker of
    each name, floats first."""
    names = [
        f"quantized: {row.quant_method}" if row.stage == "quantized" else _FLOAT_NAMES[row.stage]
        for row in data[["stage", "quant_method"]].itertuples(index=False)
    ]
    styles = {}
    for stage in _FLOAT_MARKERS:
        if _FLOAT_NAMES[stage] in names:
            styles[_FLOAT_NAMES[stage]] = _FLOAT_MARKERS[stage]
    quantized = [n for n in _unique(names) if n.startswith("quantized: ")]
    for j, name in enumerate(quantized):
        styles[name] = _QUANT_MARKERS[j % len(_QUANT_MARKERS)]
    return names, styles


def _budget_lines(ax: Axes, data: pd.DataFrame, max_drop: float) -> None:
    """A dotted line per distinct budget edge (validation baseline - ``max_drop``), named by the
    backend x models it holds for."""
    edges: dict[float, list[str]] = {}
    firsts = data.groupby(["backend", "model"], sort=False)["baseline_val_top1"].first()
    for (backend, model), top1 in firsts.items():
        edges.setdefault(round(float(top1) - max_drop, 9), []).append(f"{backend}/{model}")
    for y in edges:
        ax.axhline(y, color="grey", linewidth=0.7, linestyle=":")
    ax.figure.draw_without_rendering()  # lay out first: labels are spread in points
    labels = [(1.0, y, ", ".join(names), "dimgrey") for y, names in edges.items()]
    _spread_labels(ax, labels, ax.get_yaxis_transform(), dx=-2, ha="right")


def _mark_chosen(ax: Axes, data: pd.DataFrame, selection: Selection, column: str) -> list[Line2D]:
    """Ring the chosen rows and tag each with a letter (S: smallest, F: fastest) beside its
    ring; the legend entries returned name them in full. A letter is all that sits among the
    points, so no name covers a point, a bar or another name."""
    chosen = [(selection.champion, "S", "smallest within budget")]
    if selection.fastest:
        chosen.append((selection.fastest, "F", "fastest within budget"))
    else:
        chosen = [(selection.champion, "S", "smallest and fastest within budget")]
    entries = []
    for choice, tag, role in chosen:
        rows = data[data["label"] == choice.label]
        if rows.empty:  # e.g. its latency was not measured
            continue
        x, y = float(rows[column].iloc[0]), float(rows["val_top1"].iloc[0])
        ax.scatter([x], [y], s=150, facecolors="none", edgecolors=_CHOSEN, linewidths=1.4)
        ax.annotate(
            tag,
            xy=(x, y),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=8,
            fontweight="bold",
            color=_CHOSEN,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        )
        entries.append(
            _line(
                _CHOSEN,
                f"{tag}: {role}\n{_wrap_label(choice.label)}",
                "none",
                marker="o",
                hollow=True,
            )  # fmt: skip
        )
    return entries


def _wrap_label(label: str, width: int = 44) -> str:
    """A node label broken after slashes into lines of at most about ``width`` characters."""
    lines = [""]
    for part in label.split("/"):
        piece = part if not lines[-1] else f"/{part}"
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("  /" + part)
        else:
            lines[-1] += piece
    return "\n".join(lines)


def _spread(wishes: Sequence[float], gap: float) -> list[float]:
    """Positions as near ``wishes`` as labels at least ``gap`` apart allow, in the same order:
    each run of labels that would collide is spaced ``gap`` apart around its wishes' mean."""
    order = sorted(range(len(wishes)), key=lambda i: wishes[i])
    runs: list[list[int]] = []

    def start(run: list[int]) -> float:
        return float(np.mean([wishes[i] - k * gap for k, i in enumerate(run)]))

    for i in order:
        runs.append([i])
        while len(runs) > 1 and start(runs[-2]) + len(runs[-2]) * gap > start(runs[-1]):
            runs[-2:] = [runs[-2] + runs[-1]]
    placed = [0.0] * len(wishes)
    for run in runs:
        first = start(run)
        for k, i in enumerate(run):
            placed[i] = first + k * gap
    return placed


def _spread_labels(
    ax: Axes,
    labels: Sequence[tuple[float, float, str, object]],
    transform,
    *,
    dx: float,
    ha: str,
) -> None:
    """Write each (x, y, text, colour) at its point, offset ``dx`` points sideways and moved
    up or down just enough that no two labels overlap (a leader joins a moved label to it).
    Call it once the figure is laid out (``Figure.draw_without_rendering``): the spreading is
    done in points on the page, where the text size is known."""
    if not labels:
        return
    to_points = 72.0 / ax.figure.dpi
    heights = [transform.transform((x, y))[1] * to_points for x, y, _, _ in labels]
    box = ax.get_window_extent()
    low, high = box.y0 * to_points, box.y1 * to_points - _LABEL_POINTS * _LABEL_GAP
    placed = _spread(heights, _LABEL_POINTS * _LABEL_GAP)
    shift = min(0.0, high - max(placed)) or max(0.0, low - min(placed))  # keep them inside
    for (x, y, text, colour), wish, at in zip(labels, heights, placed, strict=True):
        moved = at + shift - wish
        ax.annotate(
            text,
            xy=(x, y),
            xycoords=transform,
            xytext=(dx, 1 + moved),
            textcoords="offset points",
            ha=ha,
            va="bottom",
            fontsize=_LABEL_POINTS,
            color=colour,
            bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.75},
            arrowprops=None
            if abs(moved) < _LABEL_POINTS / 2
            else {"arrowstyle": "-", "color": colour, "linewidth": 0.6, "shrinkA": 0},
        ).set_in_layout(False)


def layer_sparsity(layers: Mapping[str, Sequence[Mapping]], path: Path) -> None:
    """Per-layer sparsity (1 - nonzero / weights) as bars in forward order, one panel per model;
    grey dots on a log axis give each layer's weight count, since large layers matter most.

    Args:
        layers: panel title -> [{"layer": name, "weights": count, "nonzero": count}, ...].
    """
    widest = max((len(rows) for rows in layers.values()), default=1)
    fig = Figure(figsize=(max(7.0, 1.5 + 0.16 * widest), 0.4 + 3.3 * max(len(layers), 1)))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(max(len(layers), 1), 1, squeeze=False)[:, 0]
    for ax, (title, rows) in zip(axes, layers.items(), strict=False):
        names = [str(r["layer"]) for r in rows]
        weights = np.array([float(r["weights"]) for r in rows])
        nonzero = np.array([float(r["nonzero"]) for r in rows])
        with np.errstate(divide="ignore", invalid="ignore"):
            sparsity = np.where(weights > 0, 1.0 - nonzero / weights, np.nan)
        total = weights.sum()
        overall = f", {1 - nonzero.sum() / total:.1%} overall" if total > 0 else ""
        ax.set_title(f"{title}{overall}", fontsize=8)
        if not names:
            ax.text(0.5, 0.5, "no layers counted", ha="center", va="center")
            ax.set_axis_off()
            continue
        positions = np.arange(len(names))
        ax.bar(positions, sparsity, color="C0", alpha=0.75, width=0.8)
        ax.set_ylim(0, 1)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_ylabel("sparsity", fontsize=8)
        ax.set_xticks(positions, names, rotation=90, fontsize=6)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        counts = ax.twinx()
        counted = weights > 0
        counts.plot(positions[counted], weights[counted], "o", color="dimgrey", markersize=3)
        if counted.any():
            counts.set_yscale("log")
            counts.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            counts.yaxis.set_minor_formatter(NullFormatter())
            counts.yaxis.set_major_formatter(EngFormatter(sep=""))
        counts.set_ylabel("weights (dots, log)", fontsize=7, color="dimgrey")
        counts.tick_params(axis="y", labelsize=6, colors="dimgrey")
    if not layers:
        axes[0].text(0.5, 0.5, "no layers counted", ha="center", va="center")
        axes[0].set_axis_off()
    _save(fig, path)


def sensitivity(curves: Mapping[str, pd.DataFrame], max_drop: float, path: Path) -> None:
    """Val top-1 drop (points, positive is worse) against pruning ratio, one line per group,
    one panel per backend/model (rows: models, columns: backends, shared axes).

    Deep networks have dozens of groups, more than a legend can tell apart, so a line's colour
    gives its depth (first layer to last) and the ``_NAMED`` most sensitive groups of each panel
    are named at their line's end; sensitivity.csv has the rest.

    Args:
        curves: "backend/model" -> the rows of its sensitivity.csv.
    """
    keys = [name.partition("/") for name in curves]
    backends, models = _unique(k[0] for k in keys), _unique(k[2] for k in keys)
    fig = Figure(
        figsize=(1.5 + 4.6 * max(len(backends), 1), 0.6 + 2.9 * max(len(models), 1)),
        layout="constrained",
    )
    axes = fig.subplots(
        max(len(models), 1), max(len(backends), 1), sharex=True, sharey=True, squeeze=False
    )
    named: dict[Axes, dict[tuple[float, float], list]] = {}  # ends -> [colour, groups]
    for (r, model), (c, backend) in _grid(models, backends):
        ax = axes[r][c]
        frame = curves.get(f"{backend}/{model}" if model else backend)
        if frame is None or frame.empty:
            ax.set_axis_off()
            continue
        groups = list(frame.groupby("group", sort=False))
        worst = set(
            frame.groupby("group", sort=False)["drop"].max().nlargest(_NAMED, keep="first").index
        )
        # Groups often end on the same point (e.g. at chance level): one label names them all.
        ends = named.setdefault(ax, {})
        for i, (group, rows) in enumerate(groups):
            rows = rows.sort_values("ratio", kind="stable")
            x, y = [0.0, *rows["ratio"]], [0.0, *(rows["drop"] * 100)]
            colour = _DEPTH(i / max(len(groups) - 1, 1))
            ax.plot(
                x,
                y,
                color=colour,
                marker="o",
                markersize=2,
                linewidth=0.9,
            )
            if group in worst:
                end = ends.setdefault((round(x[-1], 3), round(y[-1], 1)), [colour, []])
                end[1].append(str(group))
        ax.axhline(max_drop * 100, color="grey", linewidth=0.8, linestyle="--")
        _panel(
            ax,
            f"{backend}/{model}" if model else backend,
            r == len(models) - 1,
            c == 0,
            "share of the group pruned (alone, no fine-tuning)",
            "val top-1 drop (pt)",
        )
    if curves:
        bar = fig.colorbar(
            ScalarMappable(cmap=_DEPTH), ax=axes, ticks=[0, 1], shrink=0.5, aspect=30
        )
        bar.ax.set_yticklabels(["first group", "last group"], fontsize=7)
        fig.legend(
            handles=[_line("grey", f"budget: {max_drop * 100:g} pt", "--")],
            loc="outside lower center",
            fontsize=7,
            frameon=False,
        )
    else:
        axes[0][0].text(0.5, 0.5, "no sensitivity sweep", ha="center", va="center")
        axes[0][0].set_axis_off()
    # Named last, on the final layout and shared limits, so near ends get spread labels.
    fig.draw_without_rendering()
    for ax, ends in named.items():
        labels = [(x, y, ", ".join(names), colour) for (x, y), (colour, names) in ends.items()]
        _spread_labels(ax, labels, ax.transData, dx=-3, ha="right")
    _save(fig, path)


def _panel(ax: Axes, title: str, bottom: bool, left: bool, xlabel: str, ylabel: str) -> None:
    """One panel of a grid over backends x models, its x axis a share in percent; only the
    bottom row and the left column carry axis labels."""
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    if bottom:
        ax.set_xlabel(xlabel, fontsize=8)
    if left:
        ax.set_ylabel(ylabel, fontsize=8)


def _save(fig: Figure, path: Path) -> None:
    """Save as an 8-bit palette PNG: a plot has few colours, and the palette makes files 3-4x
    smaller than matplotlib's RGBA at no visible cost (index.html embeds every one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    with Image.open(buffer) as image:
        # No dithering: flat areas stay flat (and small); 256 colours cover the antialiasing.
        palette = image.convert("RGB").quantize(
            256, Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
        )
    palette.save(path, format="PNG", optimize=True)


def _unique(values: Iterable) -> list:
    """Distinct values in order of first appearance (the summary's order is the DAG's)."""
    return list(dict.fromkeys(values))


def _grid(rows: list, columns: list) -> list[tuple[tuple[int, object], tuple[int, object]]]:
    return [(r, c) for r in enumerate(rows) for c in enumerate(columns)]


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _method_style(i: int) -> str:
    """Line style of the i-th method: the 10-colour cycle repeats, the style tells them apart."""
    return _LINE_STYLES[i // 10 % len(_LINE_STYLES)]


def _method_colour(method: str, methods: list[str]) -> str:
    return _colour(methods.index(method)) if method in methods else "black"


def _line(
    colour: str,
    label: str,
    style: str,
    *,
    marker: str = "",
    alpha: float = 1.0,
    hollow: bool = False,
) -> Line2D:
    """A legend entry drawn on no axes."""
    return Line2D(
        [],
        [],
        color=colour,
        linestyle=style,
        marker=marker,
        markersize=5,
        markerfacecolor="none" if hollow else colour,
        alpha=alpha,
        label=label,
    )
