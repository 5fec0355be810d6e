"""`shrinkflow train`: train one baseline model, resuming from the last completed epoch.

With ``train.distributed.processes`` > 1 the command re-runs itself under the backend's
launcher (torchrun with that many processes; for TensorFlow one worker with that many
``MirroredStrategy`` replicas, since its multi-worker servers cannot bind loopback), each
given the resolved params, so Snakemake and DVC keep one command line. Rank 0 then does what a
single process does (MLflow run, resume state, model); the others only train with it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import yaml

from shrinkflow import invocation, tracking
from shrinkflow.backends.base import Backend, check_model, get_backend
from shrinkflow.dag import node_tags
from shrinkflow.data.prepared import PreparedData, load_prepared
from shrinkflow.outputs import atomic_dir, write_json
from shrinkflow.progress import say
from shrinkflow.stages import write_node
from shrinkflow.training import NO_VALIDATION_IMAGES


def resume_dir_for(out: Path) -> Path:
    """The per-epoch resumable state lives beside the model folder (scratch: .dvcignore hides it,
    neither Snakemake nor DVC declares it, so neither deletes it before a re-run)."""
    return out.parent / "resume"


def run(cfg: dict, backend_name: str, model_name: str, data_dir: Path, out: Path) -> None:
    backend = get_backend(backend_name)
    check_model(backend, model_name)
    data = load_prepared(data_dir)
    resume_dir = resume_dir_for(out)
    processes = int(cfg["train"]["distributed"]["processes"])
    rank = backend.worker_rank()
    if processes > 1 and rank is None:
        _launch(cfg, backend, model_name, data_dir, out, processes)
        return
    if rank:
        _follow(cfg, backend, model_name, data, resume_dir)
        return
    resume_dir.mkdir(parents=True, exist_ok=True)  # scratch beside the model; .dvcignore hides it
    fingerprint = backend.train_fingerprint(cfg, model_name, data)
    node = {"backend": backend_name, "model": model_name, "stage": "baseline"}
    with tracking.job_run(
        cfg,
        "train",
        out=out,
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
            write_json(staging / "train.json", summary, nan_means=NO_VALIDATION_IMAGES)
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


def _launch(
    cfg: dict, backend: Backend, model_name: str, data_dir: Path, out: Path, processes: int
) -> None:
    """Run this stage in ``processes`` workers of ``backend``'s launcher and wait for them."""
    say(f"train {backend.name}/{model_name}: {processes} data-parallel processes")
    # The workers' nearest launcher is this process, not the `dvc repro` above it: hand them
    # this job's invocation id, so rank 0's run joins the other jobs of the invocation.
    os.environ[invocation.ENV] = invocation.invocation_id()
    with tempfile.TemporaryDirectory(prefix="shrinkflow-train-") as tmp:
        # The workers read the params this process resolved (files, presets and --set).
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(cfg, sort_keys=False))
        backend.launch_workers(
            [
                "train",
                "--backend",
                backend.name,
                "--model",
                model_name,
                "--in",
                str(data_dir),
                "--out",
                str(out),
                "--params",
                str(params),
            ],
            processes,
        )


def _follow(
    cfg: dict, backend: Backend, model_name: str, data: PreparedData, resume_dir: Path
) -> None:
    """A worker of rank > 0: train along with rank 0 (resuming from its state) and keep
    nothing; it never opens the tracking store."""
    with tempfile.TemporaryDirectory(prefix="shrinkflow-follower-") as scratch:
        backend.train_model(
            cfg, model_name, data, Path(scratch), resume_dir, lambda epoch, metrics: None, None
        )
