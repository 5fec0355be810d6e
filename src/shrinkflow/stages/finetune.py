"""`shrinkflow finetune`: re-train a pruned model with its masks (or smaller shape) fixed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from shrinkflow import tracking
from shrinkflow.backends.base import get_backend
from shrinkflow.dag import node_label, node_tags
from shrinkflow.data.prepared import load_prepared
from shrinkflow.outputs import atomic_dir, write_json
from shrinkflow.progress import say
from shrinkflow.stages import read_node, write_node
from shrinkflow.training import NO_VALIDATION_IMAGES


def run(cfg: dict, model_dir: Path, data_dir: Path, out: Path) -> None:
    node = {**read_node(model_dir), "stage": "finetuned"}
    backend = get_backend(node["backend"])
    data = load_prepared(data_dir)
    resume_dir = out.parent / "resume"
    resume_dir.mkdir(parents=True, exist_ok=True)  # scratch beside the model; .dvcignore hides it
    fingerprint = backend.finetune_fingerprint(cfg, model_dir, data)
    label = node_label(node)
    with tracking.job_run(
        cfg,
        "finetune",
        out=out,
        tags=node_tags(node),
        parent_run_id=tracking.read_run_ref(model_dir),
        run_id=backend.resumable_run_id(resume_dir, fingerprint),
        run_name=f"finetune {label}",
    ) as job:
        with atomic_dir(out) as staging:
            result = backend.finetune_model(
                cfg,
                model_dir,
                data,
                staging,
                resume_dir,
                on_epoch=lambda epoch, metrics: job.log_metrics(metrics, step=epoch),
                run_id=job.run_id,
            )
            write_json(staging / "train.json", asdict(result), nan_means=NO_VALIDATION_IMAGES)
            write_node(staging, node, job.run_id, "finetune")
        job.log_metrics({"best_val_top1": result.best_val_top1, "train_seconds": result.seconds})
        job.log_artifact(out)  # a folder keeps its name: artifacts/model/...
        say(f"finetune {label}: best val top-1 {result.best_val_top1:.4f}")
