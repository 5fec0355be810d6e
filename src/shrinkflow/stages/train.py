"""`shrinkflow train`: train one baseline model, resuming from the last completed epoch.

With ``train.distributed.processes`` > 1 the command re-runs itself under the backend's
launcher (torchrun with that many processes; for TensorFlow one worker with that many
``MirroredStrategy`` replicas, since its multi-worker servers cannot bind loopback), each
given the resolved params, so Snakemake and DVC keep one command line. Rank 0 then does what a
single process does (MLflow run, resume state, model); the others only train with it.

``seed`` is the training seed (a ``seeds`` entry): the backend trains with it as its
``cfg["seed"]`` (``stages.job_config``) and node.json records it, so every later stage of the
chain reads it from there.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import yaml

from shrinkflow import invocation
from shrinkflow.backends.base import JobContext, backend_module, use_safe_training_kernels
from shrinkflow.custom_models import check_buildable
from shrinkflow.dag import node_label, seed_folder
from shrinkflow.data.prepared import PreparedData, load_prepared
from shrinkflow.gpu_slots import hold_gpu_slots
from shrinkflow.progress import say
from shrinkflow.stages import job_config
from shrinkflow.stages.model_job import TRAINING_METRICS, model_job, resume_dir_for


def run(
    cfg: dict, backend_name: str, model_name: str, seed: int, data_dir: Path, out: Path
) -> None:
    check_buildable(cfg, backend_name, model_name)
    use_safe_training_kernels({"backend": backend_name, "model": model_name})
    hold_gpu_slots(int(cfg["train"]["distributed"]["processes"]))  # one GPU per process
    params = cfg  # as given: the MLflow run logs them
    cfg = job_config(cfg, seed)
    train = backend_module(backend_name, "train")
    data = load_prepared(data_dir)
    resume_dir = resume_dir_for(out)
    processes = int(cfg["train"]["distributed"]["processes"])
    rank = backend_module(backend_name, "distributed").worker_rank()
    if processes > 1 and rank is None:
        _launch(params, backend_name, model_name, seed, data_dir, out, processes)
        return
    if rank:
        _follow(cfg, train, model_name, data, resume_dir)
        return
    resume_state = backend_module(backend_name, "resume_state")
    fingerprint = resume_state.train_fingerprint(cfg, model_name, data)
    node = {"backend": backend_name, "model": model_name, "stage": "baseline", "seed": seed}
    with model_job(
        params,
        "train",
        node,
        out,
        data_dir,
        run_id=resume_state.resumable_run_id(resume_dir, fingerprint),
        logged=TRAINING_METRICS,
        run_name=f"train {backend_name}/{model_name}/{seed_folder(seed)}",
    ) as job:
        result = train.train_model(
            cfg,
            model_name,
            data,
            job.context,
        )
        job.facts = asdict(result)
    say(
        f"train {node_label(node)}: best val top-1 {result.best_val_top1:.4f} "
        f"at epoch {result.best_epoch} ({result.seconds:.1f} s)"
    )


def _launch(
    cfg: dict,
    backend: str,
    model_name: str,
    seed: int,
    data_dir: Path,
    out: Path,
    processes: int,
) -> None:
    """Run this stage in ``processes`` workers of ``backend``'s launcher and wait for them."""
    say(f"train {backend}/{model_name}: {processes} data-parallel processes")
    # The workers' nearest launcher is this process, not the `dvc repro` above it: hand them
    # this job's invocation id, so rank 0's run joins the other jobs of the invocation.
    os.environ[invocation.ENV] = invocation.invocation_id()
    with tempfile.TemporaryDirectory(prefix="shrinkflow-train-") as tmp:
        # The workers read the params this process resolved (files, presets and --set).
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(cfg, sort_keys=False))
        backend_module(backend, "distributed").launch(
            [
                "train",
                "--backend",
                backend,
                "--model",
                model_name,
                "--seed",
                str(seed),
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
    cfg: dict, train: ModuleType, model_name: str, data: PreparedData, resume_dir: Path
) -> None:
    """A worker of rank > 0: train along with rank 0 (resuming from its state) with the
    backend's ``train`` module and keep nothing; it never opens the tracking store."""
    with tempfile.TemporaryDirectory(prefix="shrinkflow-follower-") as scratch:
        train.train_model(
            cfg,
            model_name,
            data,
            JobContext(Path(scratch), resume_dir),
        )
