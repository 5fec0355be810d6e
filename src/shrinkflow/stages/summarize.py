"""`shrinkflow summarize`: gather every evaluated node's metrics.json into results/summary.csv."""

from __future__ import annotations

import csv
from pathlib import Path

from shrinkflow import tracking
from shrinkflow.dag import evaluated_nodes
from shrinkflow.errors import ShrinkflowError
from shrinkflow.metrics import SUMMARY_COLUMNS
from shrinkflow.outputs import atomic_file, read_json
from shrinkflow.progress import say


def collect_rows(cfg: dict, models_dir: Path) -> list[dict]:
    """Rows for exactly the nodes the configured DAG evaluates (stale folders are ignored)."""
    rows = []
    for node in evaluated_nodes(cfg):
        path = models_dir / node.metrics.relative_to("results/models")
        if not path.is_file():
            raise ShrinkflowError(
                f"{path}: missing (run `shrinkflow evaluate` for this node first)"
            )
        record = read_json(path)
        rows.append({column: _cell(record.get(column)) for column in SUMMARY_COLUMNS})
    return rows


def _cell(value: object) -> object:
    return "" if value is None else value


def run(cfg: dict, models_dir: Path, out: Path) -> None:
    rows = collect_rows(cfg, models_dir)
    with tracking.job_run(cfg, "summarize", out=out) as job:  # named "summarize"
        with atomic_file(out) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        job.log_artifact(out)
        job.log_metrics({"rows": len(rows)})
    say(f"summarize: {len(rows)} row(s) -> {out}")
