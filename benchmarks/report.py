"""How long `shrinkflow report` takes on a 200-row summary, and how big the page is.

Targets (issue 6): under 10 s and under 5 MB. The summary is synthetic but shaped like a real
sweep (tests/report_fixtures.py): 2 backends x (baseline + 4 methods x 6 sparsities) x (float +
3 quantization methods) = 200 rows. The time is the whole CLI job as a DAG runs it: process
start, imports, the MLflow run in a fresh SQLite store, the figures and both documents.

Run: python benchmarks/report.py
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic summary is the tests' fixture

from figures import recorded  # noqa: E402
from report_fixtures import summary_rows, write_summary  # noqa: E402
from workspace import BIN, timed  # noqa: E402

OUT = ROOT / "benchmarks/out/report"
REPEATS = 3


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", OUT / "params.yaml")
    rows = summary_rows(
        backends=("torch", "tensorflow"),
        models=("resnet20",),
        methods=("l1_unstructured", "gradual_polynomial", "gradual_constant", "structured_l1"),
        sparsities=(0.3, 0.5, 0.6, 0.7, 0.8, 0.9),
        qmethods=("static_int8", "dynamic_int8", "fixed_w4"),
    )
    write_summary(OUT / "summary.csv", rows)
    (OUT / "results/models").mkdir(parents=True)
    command = [
        str(BIN / "shrinkflow"), "report",
        "--summary", "summary.csv", "--models", "results/models", "--out", "results/report",
        "--set", "report.registered_model=null",  # synthetic rows have no runs to register
    ]  # fmt: skip
    seconds = [timed(command, OUT) for _ in range(REPEATS)]
    report = OUT / "results/report"
    page = (report / "index.html").stat().st_size
    folder = sum(p.stat().st_size for p in report.rglob("*") if p.is_file())
    start = time.perf_counter()
    timed([str(BIN / "shrinkflow"), "--help"], OUT)
    cli_start = time.perf_counter() - start
    print(f"summary rows                     {len(rows)}")
    print(f"shrinkflow report, wall (median) {statistics.median(seconds):6.2f} s  (target < 10 s)")
    print(f"  all runs                       {', '.join(f'{s:.2f}' for s in seconds)} s")
    print(f"  of which CLI start (--help)    {cli_start:6.2f} s")
    print(f"index.html                       {page / 1e6:6.2f} MB  (target < 5 MB)")
    print(f"results/report in all            {folder / 1e6:6.2f} MB")
    print(f"page / target                    {page / 5e6:6.3f}")
    print(f"time / target                    {statistics.median(seconds) / 10:6.3f}")


if __name__ == "__main__":
    with recorded("report"):
        main()
