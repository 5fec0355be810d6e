"""results/summary.csv as a checked table, with the columns the report derives from it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from shrinkflow.dag import Node
from shrinkflow.errors import ShrinkflowError
from shrinkflow.metrics import SUMMARY_COLUMNS

NODE_STAGES = ("baseline", "pruned", "finetuned", "quantized")
# Columns that must hold a number in every row: the report compares and plots them.
MEASURED = ("top1", "params", "nonzero_params", "size_bytes", "gzip_bytes", "latency_ms_b1")
# Columns that may be empty (a baseline has no sparsity target, a float model no quant method).
OPTIONAL_NUMBERS = (
    "target_sparsity",
    "measured_sparsity",
    "top5",
    "macs",
    "throughput_ips",
    "peak_mem_mb",
)
TEXT = ("backend", "model", "stage", "prune_method", "quant_method", "run_id", "artifact")


def load_summary(path: Path) -> pd.DataFrame:
    """The summary's rows, checked: every column, a known stage, numbers where numbers belong,
    and one baseline per backend x model (the accuracy budget is measured from it)."""
    path = Path(path)
    if not path.is_file():
        raise ShrinkflowError(f"--summary {path}: no such file (run `shrinkflow summarize` first)")
    try:
        df = pd.read_csv(path, dtype={c: "string" for c in TEXT}, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ShrinkflowError(f"--summary {path}: not a CSV file ({exc})") from None
    except pd.errors.EmptyDataError:
        raise ShrinkflowError(f"--summary {path}: empty file, not a summary") from None
    missing = [c for c in SUMMARY_COLUMNS if c not in df.columns]
    if missing:
        raise ShrinkflowError(
            f"--summary {path}: missing column(s) {', '.join(missing)} "
            "(`shrinkflow summarize` writes all of them)"
        )
    if df.empty:
        raise ShrinkflowError(f"--summary {path}: no rows; nothing was evaluated")
    df = df[list(SUMMARY_COLUMNS)].copy()
    for column in TEXT:
        df[column] = df[column].fillna("").astype(str)
    bad_stage = df.loc[~df["stage"].isin(NODE_STAGES), "stage"]
    if not bad_stage.empty:
        raise ShrinkflowError(
            f"--summary {path}: row {bad_stage.index[0] + 2} has stage {bad_stage.iloc[0]!r}; "
            f"allowed: {', '.join(NODE_STAGES)}"
        )
    for column in MEASURED + OPTIONAL_NUMBERS:
        df[column] = _numbers(df[column], path, column, required=column in MEASURED)
    _check_baselines(df, path)
    return df.reset_index(drop=True)


def _numbers(values: pd.Series, path: Path, column: str, *, required: bool) -> pd.Series:
    text = values.astype(str).str.strip()
    numbers = pd.to_numeric(text.replace("", np.nan), errors="coerce")
    bad = numbers.isna() if required else numbers.isna() & (text != "")
    if bad.any():
        row = bad.idxmax()  # the first bad row; +2 below: the header is line 1
        problem = "is empty" if text[row] == "" else f"{text[row]!r} is not a number"
        raise ShrinkflowError(f"--summary {path}: row {row + 2}, column {column} {problem}")
    return numbers.astype(float)


def _check_baselines(df: pd.DataFrame, path: Path) -> None:
    counts = df[df["stage"] == "baseline"].groupby(["backend", "model"]).size()
    for backend, model in df[["backend", "model"]].drop_duplicates().itertuples(index=False):
        found = int(counts.get((backend, model), 0))
        if found != 1:
            what = "no baseline row" if found == 0 else f"{found} baseline rows"
            raise ShrinkflowError(
                f"--summary {path}: {what} for {backend}/{model}; the accuracy budget is "
                "measured from exactly one (stage baseline)"
            )


def annotate(df: pd.DataFrame, max_drop: float, size_metric: str) -> pd.DataFrame:
    """Add ``label`` (the node's folder under results/models), ``baseline_top1``, ``drop``
    (baseline top-1 minus top-1: positive is worse), ``eligible`` (drop within ``max_drop``),
    ``pareto`` (no other row is both smaller in ``size_metric`` and more accurate) and
    ``size`` (the ``size_metric`` column)."""
    out = df.copy()
    out["label"] = [_label(row) for row in out.itertuples(index=False)]
    baselines = out[out["stage"] == "baseline"].set_index(["backend", "model"])["top1"]
    out["baseline_top1"] = [
        baselines[(b, m)] for b, m in zip(out["backend"], out["model"], strict=True)
    ]
    out["drop"] = out["baseline_top1"] - out["top1"]
    # 1e-9: a drop of exactly the budget must not fail on float rounding (0.97 - 0.96 > 0.01).
    out["eligible"] = out["drop"] <= max_drop + 1e-9
    out["size"] = out[size_metric]
    out["pareto"] = pareto_mask(out["size"].to_numpy(), out["top1"].to_numpy())
    return out


def _label(row: tuple) -> str:
    sparsity = row.target_sparsity
    return Node(
        backend=row.backend,
        model=row.model,
        stage=row.stage,
        prune_method=row.prune_method,
        target_sparsity=None if sparsity is None or math.isnan(sparsity) else float(sparsity),
        quant_method=row.quant_method,
    ).label


def pareto_mask(size: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """True where no other point is at most as large and at least as accurate, and strictly
    better in one of the two (smaller is better in ``size``, larger in ``accuracy``)."""
    size = np.asarray(size, dtype=float)
    accuracy = np.asarray(accuracy, dtype=float)
    no_worse = (size[None, :] <= size[:, None]) & (accuracy[None, :] >= accuracy[:, None])
    better = (size[None, :] < size[:, None]) | (accuracy[None, :] > accuracy[:, None])
    return ~(no_worse & better).any(axis=1)
