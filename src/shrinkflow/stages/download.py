"""`shrinkflow download`: fetch the raw data set into data/raw/<name>."""

from __future__ import annotations

from pathlib import Path

from shrinkflow import tracking
from shrinkflow.data.download import check_source, download


def run(cfg: dict, out: Path) -> None:
    name = cfg["data"]["name"]
    check_source(cfg)
    tags = {"shrinkflow.dataset": name}
    with tracking.job_run(cfg, "download", out=out, tags=tags, run_name=f"download {name}") as job:
        facts = download(cfg, out)
        tracking.write_run_ref(out, job.run_id, "download")
        job.log_params({f"download.{k}": v for k, v in facts.items()})
