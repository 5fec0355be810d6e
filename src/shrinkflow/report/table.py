"""results/summary.csv as a checked table, with the columns the report derives from it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from shrinkflow.dag import Node
from shrinkflow.errors import ShrinkflowError
from shrinkflow.metrics import SUMMARY_COLUMNS
from shrinkflow.report import noise

NODE_STAGES = ("baseline", "pruned", "finetuned", "quantized")
# Columns that must hold a number in every row: the report compares and plots them.
MEASURED = (
    "seed",
    "top1",
    "val_top1",
    "test_images",
    "val_images",
    "params",
    "nonzero_params",
    "size_bytes",
    "gzip_bytes",
    "nominal_bytes",
    "sparse_bytes",
    "sparse_gzip_bytes",
    "latency_ms_b1",
)
# Columns that may be empty (a baseline has no sparsity target, a float model no quant method
# and no same-runtime float reference, a chain without pruning no top-1 right after pruning).
OPTIONAL_NUMBERS = (
    "target_sparsity",
    "measured_sparsity",
    "pruned_val_top1",
    "top5",
    "macs",
    "throughput_ips",
    "float_latency_ms_b1",
    "speedup_b1",
    "peak_mem_mb",
)
TEXT = (
    "backend",
    "model",
    "stage",
    "prune_method",
    "quant_method",
    "runtime",
    "run_id",
    "experiment_id",
    "artifact",
)
# What makes a node, whatever its seed: the seeds of one node are aggregated into one row.
NODE_KEY = ["backend", "model", "stage", "prune_method", "target_sparsity", "quant_method"]


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
    """One baseline per backend x model x seed: each seed's drops are measured from its own."""
    counts = df[df["stage"] == "baseline"].groupby(["backend", "model", "seed"]).size()
    keys = df[["backend", "model", "seed"]].drop_duplicates().itertuples(index=False)
    for backend, model, seed in keys:
        found = int(counts.get((backend, model, seed), 0))
        if found != 1:
            what = "no baseline row" if found == 0 else f"{found} baseline rows"
            raise ShrinkflowError(
                f"--summary {path}: {what} for {backend}/{model} seed {int(seed)}; the "
                "accuracy budget is measured from exactly one (stage baseline) per seed"
            )


def annotate(df: pd.DataFrame, max_drop: float, size_metric: str) -> pd.DataFrame:
    """One row per node, its seeds aggregated, with what the report decides and shows.

    Numbers are means over the node's seeds. Accuracy intervals (``shrinkflow.report.noise``):
    ``val_top1_low``/``_high`` and ``top1_low``/``_high``. Decisions use validation only:
    ``drop`` (the baseline's validation top-1 minus the node's, positive is worse, paired by
    seed) with ``drop_low``/``_high`` and ``within_noise`` (the interval holds 0);
    ``eligible`` (mean drop within ``max_drop``); ``pareto`` (no other node is both smaller in
    ``size_metric`` and more accurate on validation). ``test_drop`` is the same drop on the
    test split, reported and never used to decide. ``speedup`` is the batch-1 speed-up against
    the float model of the same runtime (``speedup_b1`` for quantized or converted artefacts;
    the baseline's latency over the node's for float ones, both timed in their runtime);
    ``cross_runtime`` says whether the node runs in another runtime than its baseline, whose
    ratio ``baseline_speedup`` (baseline latency / latency) then compares runtimes, not
    compression. ``label`` is the node's folder without the seed level, ``seeds`` how many
    were aggregated, ``shipped`` the folder of the seed best on validation (the artefact the
    report registers), ``interval`` says which interval the row's numbers carry.
    ``pruned_val_top1`` (with ``_low``/``_high``) is the validation top-1 of the node's pruned
    model right after pruning, before fine-tuning (NaN where the chain has none). A quantized
    node names its float ``source`` (a label; empty for float nodes) and carries
    ``quant_drop`` with ``_low``/``_high``: the source's validation top-1 minus its own, paired
    by seed (what quantization cost).
    """
    df = df.assign(_point=[_label(row) for _, row in df.iterrows()])
    rows = []
    for _, group in df.groupby(NODE_KEY, sort=False, dropna=False):
        rows.append(_aggregate(group.sort_values("seed", kind="stable"), df))
    out = pd.DataFrame(rows).reset_index(drop=True)
    # 1e-9: a drop of exactly the budget must not fail on float rounding (0.97 - 0.96 > 0.01).
    out["eligible"] = out["drop"] <= max_drop + 1e-9
    out["size"] = out[size_metric]
    out["pareto"] = pareto_mask(out["size"].to_numpy(), out["val_top1"].to_numpy())
    return out


def _aggregate(group: pd.DataFrame, df: pd.DataFrame) -> dict:
    """One node's seeds as one row (see ``annotate``)."""
    first = group.iloc[0]
    seeds = group["seed"].astype(int).tolist()
    baselines = df[
        (df["stage"] == "baseline")
        & (df["backend"] == first.backend)
        & (df["model"] == first.model)
    ].set_index("seed")
    base = baselines.loc[group["seed"]]  # each seed's own baseline, in the group's order
    row: dict = {column: first[column] for column in NODE_KEY}
    row["label"] = _label(first)
    row["seeds"] = len(seeds)
    row["seed_list"] = " ".join(str(s) for s in seeds)
    numbers = [c for c in MEASURED + OPTIONAL_NUMBERS if c not in ("seed", "target_sparsity")]
    for column in numbers:
        row[column] = float(group[column].mean())  # NaN where every seed left it empty
    row["runtime"] = first.runtime
    best = group.loc[group["val_top1"].idxmax()]  # ties: the lowest seed (sorted)
    row["shipped"] = _label(best, seed=True)
    row["shipped_seed"] = int(best.seed)
    row["run_id"], row["artifact"] = best.run_id, best.artifact
    row["experiment_id"] = best.experiment_id
    pruned = group["pruned_val_top1"].dropna()
    interval = (
        noise.accuracy_interval(pruned.tolist(), int(first.val_images))
        if len(pruned)
        else noise.Interval(math.nan, math.nan, math.nan)
    )
    row["pruned_val_top1_low"], row["pruned_val_top1_high"] = interval.low, interval.high
    row.update(_quantization_cost(group, df))
    for split, images in (("val_top1", "val_images"), ("top1", "test_images")):
        n = int(first[images])
        interval = noise.accuracy_interval(group[split].tolist(), n)
        row[f"{split}_low"], row[f"{split}_high"] = interval.low, interval.high
        row[f"baseline_{split}"] = float(base[split].mean())
        drop = noise.drop_interval(base[split].tolist(), group[split].tolist(), n)
        prefix = "" if split == "val_top1" else "test_"
        row[f"{prefix}drop"] = drop.mean
        row[f"{prefix}drop_low"], row[f"{prefix}drop_high"] = drop.low, drop.high
    row["within_noise"] = (
        first.stage != "baseline"
        and noise.Interval(row["drop"], row["drop_low"], row["drop_high"]).contains_zero()
    )
    row["interval"] = noise.describe(len(seeds), int(first.val_images), "validation")
    base_latency = float(base["latency_ms_b1"].mean())
    row["baseline_latency_ms_b1"] = base_latency
    row["baseline_speedup"] = base_latency / row["latency_ms_b1"]
    row["cross_runtime"] = first.runtime != base["runtime"].iloc[0]
    same_runtime = row["speedup_b1"]
    row["speedup"] = row["baseline_speedup"] if math.isnan(same_runtime) else same_runtime
    return row


def _quantization_cost(group: pd.DataFrame, df: pd.DataFrame) -> dict:
    """A quantized node's float source (its label) and the validation top-1 it lost against
    it, paired by seed, with its interval; empty and NaN for a float node."""
    first = group.iloc[0]
    source = _node(first).source.point_label if first.stage == "quantized" else ""
    floats = df[df["_point"] == source].set_index("seed")
    if not source or not group["seed"].isin(floats.index).all():  # float, or a partial summary
        return {"source": source, "quant_drop": math.nan, "quant_drop_low": math.nan,
                "quant_drop_high": math.nan}  # fmt: skip
    floats = floats.loc[group["seed"]]
    cost = noise.drop_interval(
        floats["val_top1"].tolist(), group["val_top1"].tolist(), int(first.val_images)
    )
    return {
        "source": source,
        "quant_drop": cost.mean,
        "quant_drop_low": cost.low,
        "quant_drop_high": cost.high,
    }


def _node(row: pd.Series) -> Node:
    """The DAG node of a summary row."""
    sparsity = row.target_sparsity
    return Node(
        backend=row.backend,
        model=row.model,
        stage=row.stage,
        prune_method=row.prune_method,
        target_sparsity=None if sparsity is None or math.isnan(sparsity) else float(sparsity),
        quant_method=row.quant_method,
        seed=int(row.seed),
    )


def _label(row: pd.Series, *, seed: bool = False) -> str:
    """The node's folder below results/models: without the seed level (the node over all its
    seeds), or with it (``seed=True``: the folder of that row's seed)."""
    node = _node(row)
    return node.label if seed else node.point_label


def pareto_mask(size: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """True where no other point is at most as large and at least as accurate, and strictly
    better in one of the two (smaller is better in ``size``, larger in ``accuracy``)."""
    size = np.asarray(size, dtype=float)
    accuracy = np.asarray(accuracy, dtype=float)
    no_worse = (size[None, :] <= size[:, None]) & (accuracy[None, :] >= accuracy[:, None])
    better = (size[None, :] < size[:, None]) | (accuracy[None, :] > accuracy[:, None])
    return ~(no_worse & better).any(axis=1)
