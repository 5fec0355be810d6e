"""Time the default DAG end to end, its no-op re-runs, and each job's fixed overhead.

Run from the project root inside the virtualenv (or `make bench`):

    python benchmarks/pipeline.py [--cores 2] [--repeats 3]

It copies the project into benchmarks/out/pipeline/ (a fresh workspace: no outputs, no MLflow
store), runs `snakemake` there, then measures in the same run, side by side:
- the whole default DAG (download -> prepare -> train -> evaluate -> summarize), and each job's
  wall time from Snakemake's own `benchmark:` files;
- a no-op `snakemake` re-run and a no-op `dvc repro` (after `dvc commit` records the outputs);
- the fixed cost every job pays before doing work: interpreter + CLI import, torch import,
  mlflow import, and opening + closing one MLflow run on an existing SQLite store.
Figures are medians of --repeats runs; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPY = ["Snakefile", "dvc.yaml", "params.yaml", "workflow", ".dvc", ".dvcignore", ".gitignore"]


def fresh_workspace(dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in COPY:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("tmp", "cache"))
        elif source.exists():
            shutil.copy(source, dest / name)
    # DVC hashes the code it depends on; a symlink keeps the copy in step with src/.
    (dest / "src").symlink_to(ROOT / "src")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed


def median_of(repeats: int, cmd: list[str], cwd: Path) -> float:
    return statistics.median(timed(cmd, cwd) for _ in range(repeats))


def job_times(workspace: Path) -> list[tuple[str, float]]:
    """Per-job wall seconds from the TSV files of the rules' `benchmark:` directives."""
    rows = []
    for tsv in sorted((workspace / "logs/benchmark").rglob("*.tsv")):
        with tsv.open() as handle:
            record = next(csv.DictReader(handle, delimiter="\t"))
        rows.append((str(tsv.relative_to(workspace / "logs/benchmark")), float(record["s"])))
    return rows


OVERHEAD_SNIPPETS = {
    "python + shrinkflow CLI import": "import shrinkflow.cli",
    "import torch + torchvision": "import torch, torchvision",
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

    print(f"default DAG (digits, {', '.join(r['model'] for r in summary)}), --cores {args.cores}")
    print(f"  end to end (fresh workspace)         {full:7.1f} s   target <= 120 s")
    for name, seconds in job_times(workspace):
        print(f"    {name:<34} {seconds:7.1f} s")
    print(f"  no-op re-run: snakemake             {noop_smk:7.2f} s   target <= 3 s")
    print(f"  no-op re-run: dvc repro             {noop_dvc:7.2f} s   target <= 3 s")
    print("fixed overhead per job (median of fresh processes)")
    for label, seconds in overhead.items():
        print(f"  {label:<44} {seconds:6.2f} s")
    for row in summary:
        print(
            f"result: {row['backend']}/{row['model']} top-1 {float(row['top1']):.4f}, "
            f"{int(row['size_bytes'])} bytes, {float(row['latency_ms_b1']):.2f} ms at batch 1"
        )


if __name__ == "__main__":
    main()
