"""`shrinkflow train`: train one baseline model, resuming from the last completed epoch."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from shrinkflow import tracking
from shrinkflow.backends.base import check_model, get_backend
from shrinkflow.dag import node_tags
from shrinkflow.data.prepared import load_prepared
from shrinkflow.outputs import atomic_dir, write_json
from shrinkflow.progress import say
from shrinkflow.stages import write_node


def resume_dir_for(out: Path) -> Path:
    """The per-epoch resumable state lives beside the model folder (a persisted DVC output)."""
    return out.parent / "resume"


def run(cfg: dict, backend_name: str, model_name: str, data_dir: Path, out: Path) -> None:
    backend = get_backend(backend_name)
    check_model(backend, model_name)
    data = load_prepared(data_dir)
    resume_dir = resume_dir_for(out)
    resume_dir.mkdir(parents=True, exist_ok=True)  # a declared DVC output, even if never used
    fingerprint = backend.train_fingerprint(cfg, model_name, data)
    node = {"backend": backend_name, "model": model_name, "stage": "baseline"}
    with tracking.job_run(
        cfg,
        "train",
        tags=node_tags(node),
        parent_run_id=tracking.read_run_ref(data_dir),
        run_id=backend.resumable_run_id(resume_dir, fingerprint),
        run_name=f"train {backend_name}/{model_name}",
    ) as job:
        with atomic_dir(out) as staging:
            result = backend.train_model(
                cfg,
                model_name,
                data,
                staging,
                resume_dir,
                on_epoch=lambda epoch, metrics: job.log_metrics(metrics, step=epoch),
                run_id=job.run_id,
            )
            summary = asdict(result)
            write_json(staging / "train.json", summary)
            write_node(staging, node, job.run_id, "train")
        job.log_metrics(
            {
                "best_val_top1": result.best_val_top1,
                "best_epoch": result.best_epoch,
                "train_seconds": result.seconds,
            }
        )
        job.log_artifact(out)  # a folder keeps its name: artifacts/model/model.pt
        say(
            f"train {backend_name}/{model_name}: best val top-1 {result.best_val_top1:.4f} "
            f"at epoch {result.best_epoch} ({result.seconds:.1f} s)"
        )
