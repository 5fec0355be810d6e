"""`shrinkflow sensitivity`: prune each layer group alone at several ratios and record the cost."""

from __future__ import annotations

from pathlib import Path

from shrinkflow import tracking
from shrinkflow.backends.base import backend_module
from shrinkflow.dag import node_tags, seed_folder
from shrinkflow.data.prepared import load_prepared
from shrinkflow.outputs import atomic_dir
from shrinkflow.progress import say
from shrinkflow.stages import job_config, read_node


def run(cfg: dict, model_dir: Path, data_dir: Path, out: Path) -> None:
    node = read_node(model_dir)
    where = f"{node['backend']}/{node['model']}/{seed_folder(node['seed'])}"
    sensitivity = backend_module(node["backend"], "sensitivity")
    data = load_prepared(data_dir)
    with tracking.job_run(
        cfg,
        "sensitivity",
        out=out,
        tags=node_tags(node),
        source_run_id=tracking.read_run_ref(model_dir),
        run_name=f"sensitivity {where}",
    ) as job:
        with atomic_dir(out) as staging:
            facts = (
                sensitivity.analyze_sensitivity(
                    job_config(cfg, node["seed"]), model_dir, data, staging
                )
                if cfg["sensitivity"]["ratios"]
                else {"groups": 0}  # sensitivity.ratios: [] switches the analysis off
            )
            tracking.write_run_ref(staging, job.run_id, "sensitivity")
        job.log_metrics({k: v for k, v in facts.items() if isinstance(v, int | float)})
        for name in ("sensitivity.csv", "sensitivity.png", "ratios.json"):
            if (out / name).is_file():
                job.log_artifact(out / name)
        say(f"sensitivity {where}: {facts['groups']} layer group(s)")
