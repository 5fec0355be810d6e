"""Training throughput of 1, 2, 4 and 8 jobs sharing one GPU: is a GPU slot per job too much?

Run from the project root inside the virtualenv, on a machine with a GPU:

    python benchmarks/gpu_share.py [--jobs 1 2 4 8] [--images 25600] [--epochs 3]
    python benchmarks/gpu_share.py --smoke      # CPU, tiny counts: checks that it runs

For each count N it starts N processes at once, as `snakemake --profile workflow/profiles/gpu`
with SHRINKFLOW_JOBS_PER_GPU=N would: each takes a GPU slot through shrinkflow.gpu_slots (all
on the first GPU, as N slots of one GPU), then trains a ResNet-20 at batch 128 with the torch
backend's own training (train.train_model: the trainer, augmentation and per-epoch validation
of `shrinkflow train`, without MLflow) on random 32x32 RGB images, CIFAR's shape. The first
epoch pays for CUDA's start, allocation and kernel selection and is not counted; the jobs wait
for each other before it, so the counted epochs overlap. Printed per N: each job's training
images/s (counted epochs, their validation pass of --val images included), the total over the
window from the first counted epoch's start to the last one's end, and that total over one
job's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 600  # every worker imports torch and starts CUDA before the go signal


def synthetic(images: int, val: int, size: int) -> object:
    """Random uint8 images and labels in PreparedData's form: the throughput of training does
    not depend on what the pixels show."""
    from shrinkflow.data.prepared import PreparedData

    rng = np.random.default_rng(0)
    total = images + val
    return PreparedData(
        images=rng.integers(0, 256, (total, size, size, 3), dtype=np.uint8),
        labels=rng.integers(0, 10, total).astype(np.int64),
        train=np.arange(images),
        val=np.arange(images, total),
        test=np.arange(0),
        classes=[str(c) for c in range(10)],
        mean=(0.5, 0.5, 0.5),
        std=(0.29, 0.29, 0.29),
        manifest={"fingerprint": f"random-{images}-{val}-{size}"},
    )


def worker(args: argparse.Namespace) -> None:
    """One job: hold a GPU slot, get ready, wait for the go file, train, print one JSON line."""
    from shrinkflow.gpu_slots import hold_gpu_slots

    hold_gpu_slots()  # before torch starts CUDA, as the stages do
    import torch

    from shrinkflow.backends.base import JobContext, backend_module
    from shrinkflow.config import load_params
    from shrinkflow.stages import job_config

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # CUDA's start, before the others wait for this job
    cfg = load_params(
        [ROOT / "params.yaml"],
        [f"train.epochs={args.epochs}", f"train.batch_size={args.batch}"],
    )
    data = synthetic(args.images, args.val, args.size)
    train = backend_module("torch", "train")
    folder = Path(args.dir) / f"job{args.worker}"
    (folder / "out").mkdir(parents=True)
    ends: list[float] = []
    (Path(args.dir) / f"ready.{args.worker}").touch()
    while not (Path(args.dir) / "go").exists():
        time.sleep(0.01)
    context = JobContext(
        folder / "out", folder / "resume", lambda epoch, m: ends.append(time.time())
    )
    train.train_model(job_config(cfg, 0), "resnet20", data, context)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": name, "start": ends[0], "end": ends[-1]}))


def run_jobs(args: argparse.Namespace, jobs: int) -> list[dict]:
    """Start ``jobs`` workers on one GPU, let them go together, and collect their lines."""
    with tempfile.TemporaryDirectory(prefix="gpu-share-") as tmp:
        env = dict(os.environ)
        env.pop("SHRINKFLOW_GPU_SLOT", None)
        env["SHRINKFLOW_JOBS_PER_GPU"] = str(jobs)
        env["SHRINKFLOW_GPU_SLOT_DIR"] = str(Path(tmp) / "slots")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        from shrinkflow.gpu_slots import visible_devices

        gpus = visible_devices()
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[0]  # every job on the one GPU measured
        options = [
            f"--{k}={getattr(args, k)}" for k in ("images", "val", "size", "epochs", "batch")
        ]
        logs = [(Path(tmp) / f"job{i}.log").open("w") for i in range(jobs)]
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(i), "--dir", tmp, *options],
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            for i, log in enumerate(logs)
        ]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(list(Path(tmp).glob("ready.*"))) < jobs:
            if any(w.poll() not in (None, 0) for w in workers) or time.monotonic() > deadline:
                for w in workers:
                    w.kill()
                fail(tmp, f"{jobs} jobs: a worker failed or was not ready in {READY_TIMEOUT_S} s")
            time.sleep(0.05)
        (Path(tmp) / "go").touch()
        lines = [w.communicate()[0] for w in workers]
        for log in logs:
            log.close()
        if any(w.returncode for w in workers):
            fail(tmp, f"{jobs} jobs: a worker failed")
    return [json.loads(line.strip().splitlines()[-1]) for line in lines]


def fail(folder: str, message: str) -> None:
    """Exit with ``message`` and the end of each worker's log."""
    tails = [
        f"--- {log.name}\n{log.read_text()[-2000:]}"
        for log in sorted(Path(folder).glob("job*.log"))
    ]
    sys.exit("\n".join([message, *tails]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--images", type=int, default=25_600, help="training images per job")
    parser.add_argument("--val", type=int, default=512, help="validation images per job")
    parser.add_argument("--size", type=int, default=32, help="image side (CIFAR: 32)")
    parser.add_argument("--epochs", type=int, default=3, help="the first is not counted")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, on CPU")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args)
        return
    if args.smoke:
        args.jobs, args.images, args.val, args.size, args.epochs = [1, 2], 256, 64, 8, 2
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU, even on a GPU machine
    counted = args.images * (args.epochs - 1)
    if counted <= 0:
        sys.exit("--epochs: at least 2 (the first is not counted)")
    base = None  # the total of one job, once measured
    for jobs in args.jobs:
        results = run_jobs(args, jobs)
        if base is None:
            print(
                f"ResNet-20, {args.size}x{args.size}, batch {args.batch}, on {results[0]['device']}"
            )
            print(f"{'jobs':>4}  {'per job img/s':>22}  {'total img/s':>11}  {'x 1 job':>7}")
        per_job = [counted / (r["end"] - r["start"]) for r in results]
        window = max(r["end"] for r in results) - min(r["start"] for r in results)
        total = counted * jobs / window
        if jobs == 1:
            base = total
        ratio = f"{total / base:.2f}" if base else "-"
        spread = f"{min(per_job):,.0f}-{max(per_job):,.0f}" if jobs > 1 else f"{per_job[0]:,.0f}"
        print(f"{jobs:>4}  {spread:>22}  {total:>11,.0f}  {ratio:>7}", flush=True)


if __name__ == "__main__":
    main()
