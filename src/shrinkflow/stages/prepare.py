"""`shrinkflow prepare`: turn data/raw/<name> into the split every backend reads."""

from __future__ import annotations

from pathlib import Path

from shrinkflow import tracking
from shrinkflow.data.prepare import prepare
from shrinkflow.errors import ShrinkflowError


def run(cfg: dict, raw: Path, out: Path) -> None:
    if not raw.is_dir():
        raise ShrinkflowError(f"--in {raw}: no such folder (run `shrinkflow download` first)")
    name = cfg["data"]["name"]
    with tracking.job_run(
        cfg,
        "prepare",
        out=out,
        tags={"shrinkflow.dataset": name},
        source_run_id=tracking.read_run_ref(raw),
        run_name=f"prepare {name}",
    ) as job:
        facts = prepare(cfg, raw, out)
        tracking.write_run_ref(out, job.run_id, "prepare")
        job.log_metrics({k: v for k, v in facts.items() if isinstance(v, int | float)})
