"""Time the default DAG end to end, its no-op re-runs, and each job's fixed overhead.

Run from the project root inside the virtualenv (or `make bench`):

    python benchmarks/pipeline.py [--cores 2] [--repeats 3]

It copies the project into benchmarks/out/pipeline/ (a fresh workspace: no outputs, no MLflow
store), runs `snakemake` there, then measures in the same run, side by side:
- the whole default DAG (download -> prepare -> train -> evaluate -> summarize), and each job's
  wall time from Snakemake's own `benchmark:` files;
- a no-op `snakemake` re-run and a no-op `dvc repro` (after `dvc commit` records the outputs);
- the fixed cost every job pays before doing work: interpreter + CLI import, torch import,
  TensorFlow import, mlflow import, and opening + closing one MLflow run on an existing SQLite
  store.
Figures are medians of --repeats runs; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workspace = fresh_workspace(ROOT / "benchmarks/out/pipeline")
    snakemake = [str(BIN / "snakemake"), "--profile", "workflow/profiles/local"]
    dvc = str(BIN / "dvc")

    full = timed([*snakemake, "--cores", str(args.cores)], workspace)
    noop_smk = median_of(args.repeats, [*snakemake, "--cores", str(args.cores)], workspace)
    timed([dvc, "commit", "-f", "-q"], workspace)
    noop_dvc = median_of(args.repeats, [dvc, "repro"], workspace)
    overhead = {
        label: median_of(args.repeats, [sys.executable, "-c", code], workspace)
        for label, code in OVERHEAD_SNIPPETS.items()
    }
    with (workspace / "results/summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))

    models = sorted({r["model"] for r in summary})
    print(
        f"default DAG (digits, {', '.join(models)}, {len(summary)} evaluated nodes), "
        f"--cores {args.cores}"
    )
    print(f"  end to end (fresh workspace)         {full:7.1f} s")
    for rule, seconds in job_times(workspace).items():
        each = f"{len(seconds)} x {statistics.median(seconds):.1f} s" if len(seconds) > 1 else ""
        print(f"    {rule:<34} {sum(seconds):7.1f} s   {each}")
    print(f"  no-op re-run: snakemake             {noop_smk:7.2f} s   target <= 3 s")
    print(f"  no-op re-run: dvc repro             {noop_dvc:7.2f} s   target <= 3 s")
    print("fixed overhead per job (median of fresh processes)")
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
