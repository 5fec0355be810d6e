"""Time the default DAG end to end as it runs now and as it ran before warm jobs, its no-op
re-runs, and each job's fixed cost.

Run from the project root inside the virtualenv (or `make bench`):

    python benchmarks/pipeline.py [--cores 2] [--repeats 3] [--skip-before]

It copies the project into benchmarks/out/pipeline/ (a fresh workspace: no outputs, no MLflow
store), runs `snakemake` there, then measures in the same run, side by side:
- the whole default DAG (download -> ... -> report), and each job's wall time from
  Snakemake's own `benchmark:` files;
- the same DAG in a second fresh workspace as it ran before issue 20 ("before"): every job a
  fresh process (SHRINKFLOW_WARM=0), every compute rule at 2 threads (no two jobs side by side
  on 2 cores), every timing repeat (evaluate.max_seconds: null); the ratio of the two;
- a no-op `snakemake` re-run and a no-op `dvc repro` (after `dvc commit` records the outputs);
- the fixed cost of a job with (almost) nothing to compute: `shrinkflow evaluate` of the
  trained baseline at one timed call of batch 1 (its imports, params, MLflow run, the model
  loaded, val/test top-1, metrics.json), in a fresh process and forked warm, per backend;
  and what a fresh process pays for its imports alone.
Figures are medians of --repeats runs; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

from figures import recorded
from workspace import BIN, ROOT, fresh_workspace, timed


def median_of(repeats: int, cmd: list[str], cwd: Path) -> float:
    return statistics.median(timed(cmd, cwd) for _ in range(repeats))


def job_times(workspace: Path) -> dict[str, list[float]]:
    """Wall seconds of every job by rule and backend ("train torch"; "summarize" for the jobs
    of no backend), from the rules' `benchmark:` TSV files."""
    times: dict[str, list[float]] = {}
    root = workspace / "logs/benchmark"
    for tsv in sorted(root.rglob("*.tsv")):
        with tsv.open() as handle:
            record = next(csv.DictReader(handle, delimiter="\t"))
        parts = tsv.relative_to(root).parts
        key = parts[0].removesuffix(".tsv")
        if len(parts) > 2:  # logs/benchmark/<rule>/<backend>/...
            key = f"{key} {parts[1]}"
        times.setdefault(key, []).append(float(record["s"]))
    return times


OVERHEAD_SNIPPETS = {
    "python + shrinkflow CLI import": "import shrinkflow.cli",
    "import torch + torchvision": "import torch, torchvision",
    "import tensorflow + tf_keras + tfmot": (
        "import tensorflow, tf_keras, tensorflow_model_optimization"
    ),
    "import mlflow": "import mlflow",
    "tracking: import, open + close one run": (
        "from shrinkflow.config import load_params; from shrinkflow import tracking; "
        "cfg = load_params(['params.yaml']); "
        "ctx = tracking.job_run(cfg, 'benchmark'); ctx.__enter__(); ctx.__exit__(None, None, None)"
    ),
}


# The "before" DAG: each rule's threads before issue 20 (every compute rule took both cores).
BEFORE_THREADS = {
    "train": 2,
    "sensitivity": 2,
    "prune": 2,
    "finetune": 2,
    "quantize": 2,
    "evaluate": 2,
    "evaluate_quantized": 2,
}
BEFORE_PARAMS = "evaluate:\n  max_seconds: null\n"
# A job with nothing to compute: one timed call at batch 1, no warm-up.
NOTHING_TO_MEASURE = (
    "--set",
    "evaluate.repeats=1",
    "--set",
    "evaluate.warmup=0",
    "--set",
    "evaluate.batch_sizes=[1]",
)


def fixed_cost(workspace: Path, backend: str, warm: bool, repeats: int) -> float:
    """Median wall seconds of `shrinkflow evaluate` on ``backend``'s baseline, warm or fresh
    (a warm run first lets a server of this environment start)."""
    model = workspace / f"results/models/{backend}/resnet20/seed0/baseline/model"
    env = {
        **os.environ,
        "SHRINKFLOW_WARM": "1" if warm else "0",
        "XDG_RUNTIME_DIR": str(workspace / ".run"),
    }

    def once(k: int) -> float:
        out = workspace / f"benchmarks-fixed-cost/{backend}-{warm}-{k}/metrics.json"
        command = [str(BIN / "shrinkflow"), "evaluate", "--in", str(model)]
        command += ["--data", str(workspace / "data/prepared/digits"), "--out", str(out)]
        return timed([*command, *NOTHING_TO_MEASURE], workspace, env)

    if warm:
        once(-1)  # starts the server if none serves this environment
        time.sleep(30)  # its imports
    return statistics.median(once(k) for k in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-before", action="store_true", help="do not time the DAG as it ran before"
    )
    args = parser.parse_args()
    workspace = fresh_workspace(ROOT / "benchmarks/out/pipeline")
    snakemake = [str(BIN / "snakemake"), "--profile", "workflow/profiles/local"]
    dvc = str(BIN / "dvc")

    # Each DAG starts as on a fresh machine: no warm server yet (a folder of its own for them).
    env = {**os.environ, "XDG_RUNTIME_DIR": str(workspace / ".run")}
    full = timed([*snakemake, "--cores", str(args.cores)], workspace, env)
    before = None
    if not args.skip_before:
        old = fresh_workspace(ROOT / "benchmarks/out/pipeline-before")
        (old / "before.yaml").write_text(BEFORE_PARAMS)
        threads = [f"{rule}={n}" for rule, n in BEFORE_THREADS.items()]
        before = timed(
            [*snakemake, "--cores", str(args.cores), "--configfile", "before.yaml"]
            + ["--set-threads", *threads],
            old,
            {**os.environ, "SHRINKFLOW_WARM": "0"},
        )
    noop_smk = median_of(args.repeats, [*snakemake, "--cores", str(args.cores)], workspace)
    timed([dvc, "commit", "-f", "-q"], workspace)
    noop_dvc = median_of(args.repeats, [dvc, "repro"], workspace)
    overhead = {
        label: median_of(args.repeats, [sys.executable, "-c", code], workspace)
        for label, code in OVERHEAD_SNIPPETS.items()
    }
    fixed = {
        backend: (
            fixed_cost(workspace, backend, False, args.repeats),
            fixed_cost(workspace, backend, True, args.repeats),
        )
        for backend in ("torch", "tensorflow")
    }
    with (workspace / "results/summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))

    models = sorted({r["model"] for r in summary})
    print(
        f"default DAG (digits, {', '.join(models)}, {len(summary)} evaluated nodes), "
        f"--cores {args.cores}"
    )
    print(f"  end to end (fresh workspace)         {full:7.1f} s   target <= 240 s")
    if before is not None:
        print(
            f"  before: fresh processes, 2 threads, every repeat {before:7.1f} s   "
            f"{before / full:.2f}x the time of now"
        )
    for rule, seconds in job_times(workspace).items():
        each = f"{len(seconds)} x {statistics.median(seconds):.1f} s" if len(seconds) > 1 else ""
        print(f"    {rule:<34} {sum(seconds):7.1f} s   {each}")
    print(f"  no-op re-run: snakemake             {noop_smk:7.2f} s   target <= 3 s")
    print(f"  no-op re-run: dvc repro             {noop_dvc:7.2f} s   target <= 3 s")
    print("fixed cost of a job with nothing to compute (shrinkflow evaluate, 1 call at batch 1)")
    for backend, (fresh, warm) in fixed.items():
        print(
            f"  {backend:<11} fresh process {fresh:6.2f} s   warm {warm:6.2f} s   "
            f"{warm / fresh:.2f} of it (target <= 0.5)"
        )
    print("of which a fresh process imports (median of fresh processes)")
    for label, seconds in overhead.items():
        print(f"  {label:<44} {seconds:6.2f} s")
    for row in summary:
        point = f"{row['prune_method']} {row['target_sparsity']}" if row["prune_method"] else ""
        print(
            f"result: {row['backend']}/{row['model']} {row['stage']} {point}: "
            f"top-1 {float(row['top1']):.4f}, {int(row['size_bytes'])} bytes, "
            f"{float(row['latency_ms_b1']):.2f} ms at batch 1"
        )


if __name__ == "__main__":
    with recorded("pipeline"):
        main()
