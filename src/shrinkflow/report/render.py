"""results/report/index.html and report.md: one context, two Jinja2 templates (templates/).

index.html is self-contained: figures are embedded as data: URIs, the CSS and the optional
column-sorting script are inline, and nothing is loaded from the network, so the page reads the
same from a laptop, an e-mail attachment or an archived DVC output. The only network addresses
are links a reader may follow: each artefact's evaluate run in the MLflow UI (``run_url``).
Nothing time-dependent goes in, so the same inputs give byte-identical files (DVC sees no
change when nothing changed).

The page is laid out for a 1,400 px window without sideways scrolling: one decision table
(accuracy with its intervals, size, latency, speed-up, the marks), the other measured columns
in a folded table below it, and each float model beside its quantized copies.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import atomic_file
from shrinkflow.report import encodings
from shrinkflow.report.selection import (
    DECIDING_SPLIT,
    SIZE_WORDS,
    Choice,
    Selection,
    points,
    speed_words,
)
from shrinkflow.tracking.store import MODEL_TRAINING_VIEW

HTML_FILE, MARKDOWN_FILE = "index.html", "report.md"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class FigureFile:
    name: str  # path relative to the report folder, e.g. figures/size_vs_accuracy.png
    title: str
    caption: str


@dataclass(frozen=True)
class ReportContext:
    title: str
    df: pd.DataFrame  # the summary as annotated by table.annotate
    selection: Selection
    figures: list[FigureFile]
    facts: list[tuple[str, str]]  # key/value lines of the header box, in order
    notes: list[str]  # what the DAG left out, e.g. "No sensitivity sweep in this DAG."
    mlflow_ui: str  # the MLflow UI's base URL, e.g. http://127.0.0.1:5000 (run links)


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of a run (MLflow 3's hash routes), opened in its model-training view
    (the UI's default is its GenAI view); ``""`` without a run id. Without an experiment id the
    UI's ``#/runs/<id>`` route finds the run's experiment itself."""
    if not run_id:
        return ""
    base = ui.rstrip("/")
    run = quote(run_id, safe="")
    page = (
        f"#/experiments/{quote(experiment_id, safe='')}/runs/{run}"
        if experiment_id
        else f"#/runs/{run}"
    )
    return f"{base}/{page}?{MODEL_TRAINING_VIEW}"


def _fraction(value: float) -> str:
    return f"{value:.4f}"


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _count(value: float) -> str:
    return f"{round(value):,}"


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _one_decimal(value: float) -> str:
    return f"{value:,.1f}"


def _two_decimals(value: float) -> str:
    return f"{value:.2f}x"


@dataclass(frozen=True)
class _Column:
    header: str
    key: str  # the DataFrame column
    fmt: Callable[[float], str]
    hint: str = ""  # the header's tooltip
    # The columns of its interval, in display order, shown under the value in the HTML page's
    # decision table (a drop's are high then low: ``points`` flips the sign).
    interval: tuple[str, str] | None = None


# The node table's number columns, in display order (the label and marks come first). Numbers
# are means over the node's training seeds; the intervals are the report's (see report.noise).
_COLUMNS = (
    _Column(
        "val top-1",
        "val_top1",
        _fraction,
        "validation accuracy, mean over seeds: decides",
        ("val_top1_low", "val_top1_high"),
    ),
    _Column("val low", "val_top1_low", _fraction, "lower end of its 95 % interval"),
    _Column("val high", "val_top1_high", _fraction, "upper end of its 95 % interval"),
    _Column(
        "val top-1 after pruning",
        "pruned_val_top1",
        _fraction,
        "the chain's pruned model right after pruning, before fine-tuning (and quantization)",
        ("pruned_val_top1_low", "pruned_val_top1_high"),
    ),
    _Column(
        "Δ val (pt)",
        "drop",
        points,
        "validation top-1 against its baseline; negative is worse",
        ("drop_high", "drop_low"),
    ),
    _Column("test top-1", "top1", _fraction, "test accuracy, reported once: decides nothing"),
    _Column("test low", "top1_low", _fraction, "lower end of its 95 % interval"),
    _Column("test high", "top1_high", _fraction, "upper end of its 95 % interval"),
    _Column("Δ test (pt)", "test_drop", points, "test top-1 against its baseline"),
    _Column("top-5", "top5", _fraction, "test"),
    _Column("seeds", "seeds", _count, "training seeds aggregated"),
    _Column("target sparsity", "target_sparsity", _percent),
    _Column("measured sparsity", "measured_sparsity", _percent, "counted from the saved weights"),
    _Column("params", "params", _count),
    _Column("non-zero params", "nonzero_params", _count),
    _Column("MACs", "macs", _count),
    _Column("bytes", "size_bytes", _count, "the deployed file"),
    _Column("gzip bytes", "gzip_bytes", _count, "the deployed file, gzipped"),
    _Column("nominal bytes", "nominal_bytes", _count, "non-zero weights x their bits / 8"),
    _Column("sparse bytes", "sparse_bytes", _count, "shrinkflow's sparse encoding (export-sparse)"),
    _Column("ms (batch 1)", "latency_ms_b1", _ms, "median time per image at batch 1"),
    _Column(
        "speed-up",
        "speedup",
        _two_decimals,
        "batch 1, against the float model of the same runtime",
    ),
    _Column("images/s", "throughput_ips", _one_decimal),
    _Column("peak MB", "peak_mem_mb", _one_decimal, "peak memory while evaluating"),
)
# The HTML page's decision table: what the choice weighs, the intervals under the values (the
# Markdown table has every column); the folded table under it: every other measured column.
_DECISION_KEYS = (
    *("val_top1", "pruned_val_top1", "drop", "top1"),
    *("gzip_bytes", "size_bytes", "latency_ms_b1", "speedup"),
)
_DECISION = tuple(next(c for c in _COLUMNS if c.key == key) for key in _DECISION_KEYS)
_SHOWN = {*_DECISION_KEYS, "val_top1_low", "val_top1_high"}  # the interval is under the mean
_DETAIL = tuple(c for c in _COLUMNS if c.key not in _SHOWN)
MARKS = {
    "champion": ("★", "the chosen model: smallest within budget"),
    "fastest": ("⚡", "fastest within budget"),
    "per_model": ("☆", "smallest within budget for its backend x model"),
    "pareto": (
        "◆",
        "on the Pareto front: no other artefact is smaller and more accurate on validation",
    ),
    "eligible": ("✓", "within the accuracy budget (mean validation top-1)"),
    "noise": ("≈", "its validation drop from the baseline is within noise (the interval holds 0)"),
}


def _text(value: float, fmt: Callable[[float], str]) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt(value)


def _sort_key(value: float) -> str:
    """The raw number a browser sorts a column by; empty for a missing value (sorted last)."""
    return "" if value is None or math.isnan(value) else repr(float(value))


def _cells(row: dict, columns: tuple[_Column, ...]) -> list[dict]:
    """A row's cells: the value, its interval (or ""), the raw number to sort by."""
    cells = []
    for c in columns:
        value = row[c.key]
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        interval = ""
        if c.interval and not missing:
            low, high = (_text(row[k], c.fmt) for k in c.interval)
            interval = f"[{low}, {high}]"
        cells.append({"text": _text(value, c.fmt), "interval": interval, "sort": _sort_key(value)})
    return cells


def _node_rows(df: pd.DataFrame, selection: Selection, ui: str) -> list[dict]:
    chosen = {selection.champion.label: ["champion"]}
    if selection.fastest:
        chosen.setdefault(selection.fastest.label, []).append("fastest")
    for choice in selection.per_model:
        chosen.setdefault(choice.label, []).append("per_model")
    rows = []
    for number, row in enumerate(df.to_dict("records"), start=1):
        marks = chosen.get(row["label"], []) + [
            flag for flag in ("pareto", "eligible") if bool(row[flag])
        ]
        if row["within_noise"]:
            marks.append("noise")
        rows.append(
            {
                "number": number,
                "label": row["label"],
                "run_id": row["run_id"],
                "run_url": run_url(ui, row["experiment_id"], row["run_id"]),
                "marks": "".join(MARKS[m][0] for m in marks),
                "eligible": bool(row["eligible"]),
                "chosen": row["label"] in chosen,
                "cells": _cells(row, _COLUMNS),
                "decision": _cells(row, _DECISION),
                "detail": _cells(row, _DETAIL),
            }
        )
    return rows


def _baselines(df: pd.DataFrame) -> dict[tuple[str, str], dict]:
    base = df[df["stage"] == "baseline"]
    return {(r["backend"], r["model"]): r for r in base.to_dict("records")}


def _pair_groups(df: pd.DataFrame, selection: Selection) -> list[dict]:
    """Each float model (the baseline, each fine-tuned point) with its quantized copies: what
    quantization cost on validation (paired by seed, with its interval), what it saved in the
    size measure, and its batch-1 speed-up against the float model timed in its own runtime."""
    size_key = selection.size_metric
    groups = []
    for source in df[df["stage"].isin(["baseline", "finetuned"])].to_dict("records"):
        copies = df[df["source"] == source["label"]].to_dict("records")
        if not copies:
            continue
        rows = []
        for row in [source, *copies]:
            quantized = row["stage"] == "quantized"
            rows.append(
                {
                    "kind": row["quant_method"] if quantized else "float",
                    "runtime": row["runtime"],
                    "val_top1": _text(row["val_top1"], _fraction),
                    "val_interval": f"[{row['val_top1_low']:.4f}, {row['val_top1_high']:.4f}]",
                    "cost": points(row["quant_drop"]) if quantized else "–",
                    "cost_interval": (
                        f"[{points(row['quant_drop_high'])}, {points(row['quant_drop_low'])}]"
                        if quantized and not math.isnan(row["quant_drop"])
                        else ""
                    ),
                    "top1": _text(row["top1"], _fraction),
                    "size": _count(row[size_key]),
                    "smaller": _ratio(source[size_key] / row[size_key]) if quantized else "–",
                    "latency": _ms(row["latency_ms_b1"]),
                    "float_latency": _text(row["float_latency_ms_b1"], _ms),
                    "speedup": _text(row["speedup_b1"], _two_decimals) if quantized else "–",
                    "eligible": bool(row["eligible"]),
                }
            )
        groups.append({"source": source["label"], "rows": rows})
    return groups


def _choice_view(choice: Choice, df: pd.DataFrame, selection: Selection, ui: str) -> dict:
    """A chosen node's key numbers, next to its baseline's."""
    row = df[df["label"] == choice.label].iloc[0]
    base = _baselines(df)[(row["backend"], row["model"])]
    unit = SIZE_WORDS[selection.size_metric]
    numbers = [
        (
            "validation top-1 (decides)",
            f"{_interval(row, 'val_top1')} ({points(row['drop'])} pt against "
            f"{base['val_top1']:.4f}, interval [{points(row['drop_high'])}, "
            f"{points(row['drop_low'])}]{', within noise' if row['within_noise'] else ''})",
        ),
        (
            "test top-1 (reported)",
            f"{_interval(row, 'top1')} ({points(row['test_drop'])} pt against {base['top1']:.4f})",
        ),
        (unit, f"{_count(row['size'])} ({base['size'] / row['size']:.1f}x smaller than baseline)"),
        ("ms per image, batch 1", f"{row['latency_ms_b1']:.2f} ({speed_words(row)})"),
        ("non-zero params", f"{_count(row['nonzero_params'])} of {_count(row['params'])}"),
        ("measured sparsity", _text(row["measured_sparsity"], _percent)),
        ("seeds", f"{row['seeds']} ({row['interval']}); shipped: {row['shipped']}"),
    ]
    return {
        "role": choice.role,
        "label": choice.label,
        "run_id": row["run_id"],
        "run_url": run_url(ui, row["experiment_id"], row["run_id"]),
        "reason": choice.reason,
        "numbers": numbers,
        "model": f"{row['backend']}/{row['model']}",
        "top1": _fraction(row["top1"]),
        "val_top1": _interval(row, "val_top1"),
        "drop": points(row["drop"]),
        "size": _count(row["size"]),
        "latency": _ms(row["latency_ms_b1"]),
    }


def _encoding_rows(df: pd.DataFrame) -> list[dict]:
    """Each artefact's five sizes (report.encodings), as `12,345 (0.25x)`."""
    table = encodings.encoding_table(df)
    return [
        {
            "label": row["label"],
            "cells": [
                f"{_text(row[c], _count)} ({_text(row[c + encodings.RATIO_SUFFIX], _ratio)})"
                for c in encodings.SIZES
            ],
        }
        for row in table.to_dict("records")
    ]


def _ratio(value: float) -> str:
    return f"{value:.3g}x"


def _interval(row: dict, column: str) -> str:
    """A mean accuracy and its interval: 0.9611 [0.9312, 0.9790]."""
    return f"{row[column]:.4f} [{row[column + '_low']:.4f}, {row[column + '_high']:.4f}]"


def _figure_path(out_dir: Path, figure: FigureFile) -> Path:
    name = PurePosixPath(figure.name)
    if name.is_absolute() or ".." in name.parts or "\\" in figure.name or not name.parts:
        raise ShrinkflowError(
            f"figure {figure.name!r}: must be a path inside the report folder (no '..', not "
            "absolute), because report.md links it relatively"
        )
    path = out_dir / name
    if not path.is_file():
        raise ShrinkflowError(f"figure {figure.name!r}: {path} was not written")
    return path


def _png_view(out_dir: Path, figure: FigureFile) -> dict:
    """The figure as a data: URI, with its pixel size (read from the PNG's IHDR chunk) so the
    browser lays the page out before decoding the images."""
    data = _figure_path(out_dir, figure).read_bytes()
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 24:
        raise ShrinkflowError(f"figure {figure.name!r}: not a PNG file")
    return {
        "title": figure.title,
        "caption": figure.caption,
        "uri": "data:image/png;base64," + base64.b64encode(data).decode("ascii"),
        "width": int.from_bytes(data[16:20], "big"),
        "height": int.from_bytes(data[20:24], "big"),
    }


def _view(ctx: ReportContext) -> dict:
    """Everything both templates show, formatted once."""
    selection = ctx.selection
    size_key = selection.size_metric
    return {
        "title": ctx.title,
        "facts": ctx.facts,
        "notes": ctx.notes,
        "budget": f"{selection.max_drop * 100:g} pt",
        "split": DECIDING_SPLIT,
        "interval": ctx.df["interval"].iloc[0],
        "unit": SIZE_WORDS[size_key],
        "eligible": selection.eligible,
        "total": selection.total,
        "champion": _choice_view(selection.champion, ctx.df, selection, ctx.mlflow_ui),
        "fastest": _choice_view(selection.fastest, ctx.df, selection, ctx.mlflow_ui)
        if selection.fastest
        else None,
        "per_model": [
            _choice_view(c, ctx.df, selection, ctx.mlflow_ui) for c in selection.per_model
        ],
        "columns": _headers(_COLUMNS, size_key),
        "decision_columns": _headers(_DECISION, size_key),
        "detail_columns": _headers(_DETAIL, size_key),
        "marks": list(MARKS.values()),
        "rows": _node_rows(ctx.df, selection, ctx.mlflow_ui),
        "pairs": _pair_groups(ctx.df, selection),
        "encoding_headers": list(encodings.SIZES.values()),
        "encodings": _encoding_rows(ctx.df),
    }


def _headers(columns: tuple[_Column, ...], size_key: str) -> list[dict]:
    return [{"header": c.header, "hint": c.hint, "measure": c.key == size_key} for c in columns]


def _markdown(text: object) -> str:
    """Text safe inside a Markdown paragraph or table cell: characters that would start
    markup (links, emphasis, HTML, cell borders) are backslash-escaped; lines are joined."""
    return re.sub(r"([\\`*\[\]<>|])", r"\\\1", " ".join(str(text).split()))


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("shrinkflow.report", "templates"),
        # On for the .html template only: Markdown has its own escaping (the `md` filter).
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = _markdown
    env.filters["urlpath"] = quote
    return env


def write_html(ctx: ReportContext, out_dir: Path) -> Path:
    """Write out_dir/index.html, embedding every figure read from out_dir/<figure.name>."""
    out_dir = Path(out_dir)
    view = _view(ctx) | {"figures": [_png_view(out_dir, f) for f in ctx.figures]}
    html = _environment().get_template("index.html").render(view)
    path = out_dir / HTML_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path


def write_markdown(ctx: ReportContext, out_dir: Path) -> Path:
    """Write out_dir/report.md, linking the figures relatively (they sit beside it)."""
    out_dir = Path(out_dir)
    for figure in ctx.figures:
        _figure_path(out_dir, figure)
    view = _view(ctx) | {"figures": ctx.figures}
    text = _environment().get_template("report.md").render(view)
    path = out_dir / MARKDOWN_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
