"""results/report/metrics.json: the report's DVC metric, numbers only.

`dvc metrics show` (and `dvc exp show`) print every scalar of every metrics file as a column,
text included, so the metric is a few numbers of the report's choice, taken from the
selection record (selection.json, which keeps the labels, reasons and intervals): for the
champion and the fastest model their validation and test top-1, accuracy drop, size and
latency at batch 1, and how many nodes were eligible of how many.
"""

from __future__ import annotations

from pathlib import Path

from shrinkflow.outputs import write_json

METRICS_JSON = "metrics.json"
# The numbers of each chosen model, in the order `dvc metrics show` lists them.
CHOICE_FIELDS = ("val_top1", "top1", "drop", "size", "latency_ms_b1")
ROLES = ("champion", "fastest")
COUNTS = ("eligible", "nodes")


def metrics_record(selection: dict) -> dict:
    """The numbers of a selection record (``stages.report``'s selection.json) that DVC shows."""
    record = {role: {f: selection[role][f] for f in CHOICE_FIELDS} for role in ROLES}
    record.update({key: selection[key] for key in COUNTS})
    bad = [
        f"{role}.{f}"
        for role in ROLES
        for f in CHOICE_FIELDS
        if isinstance(record[role][f], bool) or not isinstance(record[role][f], int | float)
    ]
    if bad:
        raise ValueError(f"selection record: {', '.join(bad)} must be numbers")
    return record


def write(folder: Path, selection: dict) -> None:
    """Write ``folder``/metrics.json from ``selection`` (its selection.json record)."""
    write_json(folder / METRICS_JSON, metrics_record(selection))
