"""What sparsity really buys: five sizes of every artefact, as a table and as one figure.

Per artefact (a row of the summary): ``nominal_bytes`` (its non-zero weights at their stored
width, nothing for where they are), ``size_bytes`` (the file as deployed), ``gzip_bytes``,
``sparse_bytes`` and ``sparse_gzip_bytes`` (its weights in shrinkflow's sparse encoding,
``shrinkflow.sparse_format``, plain and gzipped), and each as a ratio to the deployed file of
its baseline (same backend, model and seed): 0.25 is a quarter of what the baseline ships.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from shrinkflow.report.plots import _colour, _save

# The five sizes, in the order table and figure show them, with their legend names.
SIZES = {
    "nominal_bytes": "nominal (non-zero x bits)",
    "size_bytes": "file as deployed",
    "gzip_bytes": "file, gzip -9",
    "sparse_bytes": "sparse encoding",
    "sparse_gzip_bytes": "sparse encoding, gzip -9",
}
RATIO_SUFFIX = "_ratio"  # nominal_bytes -> nominal_bytes_ratio: over the baseline's size_bytes
_BASELINE_KEYS = ("backend", "model", "seed")  # a node's baseline shares these
_MARKERS = ("o", "s", "^", "D", "v")
_ROW_INCHES = 0.24  # figure height per artefact: labels stay legible at 8 pt


def baseline_size(df: pd.DataFrame) -> pd.Series:
    """Each row's baseline deployed bytes: ``baseline_size_bytes`` where the frame has it,
    else the ``size_bytes`` of the ``stage == baseline`` row with the same backend, model and
    seed (NaN where there is none)."""
    if "baseline_size_bytes" in df:
        return pd.to_numeric(df["baseline_size_bytes"], errors="coerce")
    keys = [k for k in _BASELINE_KEYS if k in df]
    base = df[df["stage"] == "baseline"].drop_duplicates(keys).set_index(keys)["size_bytes"]
    index = pd.MultiIndex.from_frame(df[keys]) if len(keys) > 1 else pd.Index(df[keys[0]])
    return pd.Series(pd.to_numeric(base, errors="coerce").reindex(index).to_numpy(), df.index)


def encoding_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per artefact of ``df`` (summary rows with ``label``), in its order: ``label``,
    ``stage``, ``quant_method``, ``sparsity`` (measured), the five sizes in bytes and each
    over the baseline's deployed bytes (``<size>_ratio``)."""
    base = baseline_size(df)
    table = pd.DataFrame(
        {
            "label": df["label"],
            "stage": df["stage"],
            "quant_method": df["quant_method"].fillna("").astype(str),
            "sparsity": pd.to_numeric(df["measured_sparsity"], errors="coerce"),
        }
    )
    for column in SIZES:
        sizes = pd.to_numeric(df[column], errors="coerce") if column in df else np.nan
        table[column] = sizes
    for column in SIZES:
        table[column + RATIO_SUFFIX] = table[column] / base.where(base > 0)
    return table.reset_index(drop=True)


def encoding_figure(df: pd.DataFrame, path: Path) -> None:
    """A dot plot of the five sizes of every artefact (one line each, log-scale bytes), saved
    as an 8-bit palette PNG at ``path`` (as the report's other figures)."""
    table = encoding_table(df)
    rows = len(table)
    fig = Figure(figsize=(7.5, 1.4 + _ROW_INCHES * max(rows, 1)))
    ax = fig.add_subplot()
    y = np.arange(rows)[::-1]  # the first artefact on top
    for i, (column, name) in enumerate(SIZES.items()):
        values = table[column].to_numpy(dtype=float)
        shown = np.isfinite(values) & (values > 0)
        ax.scatter(
            values[shown],
            y[shown],
            s=22,
            marker=_MARKERS[i],
            color=_colour(i),
            alpha=0.85,
            label=name,
            zorder=3,
        )
    ax.set_xscale("log")
    ax.set_yticks(y, table["label"].astype(str), fontsize=8)
    ax.set_ylim(-0.7, rows - 0.3)
    ax.set_xlabel("bytes (log scale)")
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.grid(axis="y", alpha=0.15)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.04), ncol=3, frameon=False)
    _save(fig, Path(path))
