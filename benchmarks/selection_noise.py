"""How much a champion picked on the test split differs from one picked on validation, and how
wide the report's intervals are, on digits with several training seeds.

Run from the project root inside the virtualenv:

    python benchmarks/selection_noise.py [--seeds 0 1 2] [--cores 2] [--configfile my.yaml]
    python benchmarks/selection_noise.py --summary results/summary.csv   # no run: analyse one

Without --summary it copies the project into benchmarks/out/selection_noise/ (no outputs, no
MLflow store) and runs the default DAG there (merged with --configfile, as `snakemake
--configfile` does) with `seeds` set to --seeds, then reads its
results/summary.csv. For each seed alone (what a single-seed study sees) and for the seeds
together (means), it picks the champion twice, as the report does: on validation top-1 (the
report's rule) and on test top-1 (the rule before issue 17: the test split decides), and
prints where the two differ; then the median widths of the intervals the report shows.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import yaml
from figures import recorded
from workspace import BIN, ROOT, fresh_workspace, timed

from shrinkflow.config import load_params, read_yaml
from shrinkflow.report import selection, table


def test_decides(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as if the test split were the validation split: selecting from it is
    selecting on test."""
    return summary.assign(val_top1=summary["top1"], val_images=summary["test_images"])


def champions(summary: pd.DataFrame, budget: float, size_metric: str) -> tuple[str, str]:
    """The champion chosen on validation and the one chosen on test."""
    picks = []
    for rows in (summary, test_decides(summary)):
        annotated = table.annotate(rows, budget, size_metric)
        picks.append(selection.select(annotated, budget, size_metric).champion.label)
    return picks[0], picks[1]


def widths(annotated: pd.DataFrame) -> dict[str, float]:
    """Median interval widths in points, over the nodes."""
    return {
        f"{name} (pt)": statistics.median(
            (annotated[f"{column}_high"] - annotated[f"{column}_low"]) * 100
        )
        for name, column in (
            ("validation top-1", "val_top1"),
            ("test top-1", "top1"),
            ("validation drop", "drop"),
        )
    }


def analyse(summary_path: Path, budget: float, size_metric: str) -> None:
    summary = table.load_summary(summary_path)
    seeds = sorted(int(s) for s in summary["seed"].unique())
    test_images = int(summary["test_images"].iloc[0])
    print(f"summary: {summary_path} ({len(summary)} rows, seeds {seeds})")
    print(f"one test image is {100 / test_images:.2f} pt ({test_images} test images)")
    print(f"budget {budget * 100:g} pt, size measure {size_metric}\n")
    print(f"{'selection':<14} {'chosen on validation':<58} {'chosen on test':<58} differ")
    differ = 0
    for seed in seeds:
        on_val, on_test = champions(summary[summary["seed"] == seed], budget, size_metric)
        differ += on_val != on_test
        print(f"seed {seed:<9} {on_val:<58} {on_test:<58} {'yes' if on_val != on_test else 'no'}")
    on_val, on_test = champions(summary, budget, size_metric)
    print(
        f"{'mean of seeds':<14} {on_val:<58} {on_test:<58} {'yes' if on_val != on_test else 'no'}"
    )
    print(f"\nsingle-seed champions that differ: {differ} of {len(seeds)}\n")
    print("median interval width over the nodes (95 %):")
    for seed in seeds[:1]:
        one = table.annotate(summary[summary["seed"] == seed], budget, size_metric)
        for name, width in widths(one).items():
            print(f"  one seed (Wilson / Newcombe), {name}: {width:.2f}")
    if len(seeds) >= 2:
        every = table.annotate(summary, budget, size_metric)
        for name, width in widths(every).items():
            print(f"  {len(seeds)} seeds (Student-t), {name}: {width:.2f}")
        noise = int(every["within_noise"].sum())
        print(f"  nodes whose validation drop is within noise: {noise} of {len(every) - 1}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--configfile", type=Path, help="a params file merged over params.yaml")
    parser.add_argument("--summary", type=Path, help="analyse this summary.csv instead of running")
    args = parser.parse_args()
    files = [ROOT / "params.yaml"] + ([args.configfile] if args.configfile else [])
    cfg = load_params(files)
    budget, size_metric = cfg["report"]["max_accuracy_drop"], cfg["report"]["size_metric"]
    if args.summary is None:
        workspace = fresh_workspace(ROOT / "benchmarks/out/selection_noise")
        extra = read_yaml(args.configfile) if args.configfile else {}
        (workspace / "benchmark.yaml").write_text(yaml.safe_dump({**extra, "seeds": args.seeds}))
        seconds = timed(
            [
                str(BIN / "snakemake"),
                "--profile",
                "workflow/profiles/local",
                "--cores",
                str(args.cores),
                "--configfile",
                "benchmark.yaml",
            ],
            workspace,
        )
        print(f"snakemake with seeds {args.seeds}: {seconds / 60:.1f} min")
        if extra:  # the block in docs/figures.md names the file, not what it held
            print(f"over params.yaml: {args.configfile} = {extra}")
        args.summary = workspace / "results/summary.csv"
    analyse(args.summary, budget, size_metric)


if __name__ == "__main__":
    with recorded("selection-noise"):
        main()
