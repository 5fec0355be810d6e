"""The TensorFlow backend against PyTorch, tfmot's two schedules, and the four TFLite formats.

Run from the project root inside the virtualenv:

    python benchmarks/tensorflow.py [--model resnet20] [--epochs 8] [--cores 2] [--reuse]

Runs the DAG through Snakemake in a fresh workspace (benchmarks/out/tensorflow) on the default
digits data at 32x32, in one run:

1. the baseline on both backends (same split, same params), for training throughput;
2. TensorFlow: tfmot's polynomial-decay and constant-sparsity schedules at 60 % and 70 %
   (re-trained from the baseline, then fine-tuned), for accuracy against sparsity;
3. TensorFlow: the baseline converted to TFLite float32, float16, dynamic-range int8 and full
   int8, and the 70 % polynomial point to dynamic-range and full int8, for bytes, gzip bytes,
   accuracy and batch-1 latency.

It prints each table, the issue's targets (met or missed, never hidden) and where the size
factor comes from, step by step from the dense Keras file. Training throughput is images per
second of one epoch (the training split plus scoring the val split) over epochs 2.. (epoch 1
also traces and compiles), read from each train job's train.json. Snakemake builds only these
nodes (their metrics.json are its targets). Timings are clean only on a quiet machine: keep
--cores at 2 (every rule declares 2 threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import yaml
from figures import recorded
from workspace import BIN, ROOT, failure, fresh_workspace, read_metrics, train_seconds

from shrinkflow import dag

TF = "tensorflow"
SCHEDULES = ["gradual_polynomial", "gradual_constant"]
SPARSITIES = [0.6, 0.7]
TFLITE = ["float32", "float16", "dynamic_int8", "static_int8"]
SPARSE_POINT = ("gradual_polynomial", 0.7)
SPARSE_TFLITE = ["dynamic_int8", "static_int8"]
INT8_SIZE_TARGET, INT8_MAX_DROP_PT = 0.27, 0.5  # against the float32 .tflite
PRUNED_MAX_DROP_PT = 1.0  # 60 % polynomial, fine-tuned, against the dense model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=8, help="baseline epochs (params.yaml: 8)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument(
        "--reuse", action="store_true", help="continue in the existing workspace (a killed run)"
    )
    args = parser.parse_args()
    workspace = ROOT / "benchmarks/out/tensorflow"
    if not (args.reuse and workspace.is_dir()):
        fresh_workspace(workspace)
    model = args.model
    base = dag.baseline(TF, model)
    points = {(m, s): dag.finetuned(TF, model, m, s) for m in SCHEDULES for s in SPARSITIES}
    sparse = points[SPARSE_POINT]
    plan = {
        "torch": dag.baseline("torch", model),
        "dense": base,
        **{f"{m} {s}": node for (m, s), node in points.items()},
        **{q: dag.quantized(TF, model, q, base) for q in TFLITE},
        **{f"sparse {q}": dag.quantized(TF, model, q, sparse) for q in SPARSE_TFLITE},
    }
    shared = {"models": [model], "train": {"epochs": args.epochs}, "sensitivity": {"ratios": []}}
    runs = {  # one Snakemake run per backend: float16/float32 exist only on TensorFlow
        "torch": ({**shared, "backends": ["torch"], "quantize": {"methods": []}}, ["torch"]),
        TF: (
            {
                **shared,
                "backends": [TF],
                "prune": {"methods": SCHEDULES, "sparsities": SPARSITIES},
                "quantize": {"methods": TFLITE},
            },
            [name for name in plan if name != "torch"],
        ),
    }
    start = time.perf_counter()
    for backend, (config, names) in runs.items():
        (workspace / f"{backend}.yaml").write_text(yaml.safe_dump(config))
        targets = [str(plan[name].metrics) for name in names]
        # --keep-going: a failed node is listed below with its reason instead of hiding others
        done = subprocess.run(
            [str(BIN / "snakemake"), "--cores", str(args.cores), "--configfile",
             f"{backend}.yaml", "--keep-going", *targets],
            cwd=workspace, capture_output=True, text=True,
        )  # fmt: skip
        (workspace / f"snakemake-{backend}.log").write_text(done.stdout + done.stderr)
    seconds = time.perf_counter() - start
    rows = {name: read_metrics(workspace, node) for name, node in plan.items()}
    print(
        f"digits 32x32, {model}, train {args.epochs} epoch(s), {len(plan)} evaluated nodes: "
        f"{seconds:.0f} s wall with --cores {args.cores}"
    )
    print()
    print_training(workspace, model)
    if rows["dense"] is not None:
        print()
        print_schedules(rows)
        print()
        print_tflite(rows, workspace)
        print()
        print_size_factors(rows)
        print()
        report_targets(rows)
    for name, node in plan.items():
        if rows[name] is None:
            print(f"not measured: {name}: {failure(workspace, node)}")


def print_training(workspace: Path, model: str) -> None:
    """Training throughput of the two backends' baselines, from their train.json."""
    rates = {}
    for backend in ("torch", TF):
        record = workspace / dag.baseline(backend, model).model_dir / "train.json"
        if not record.is_file():
            print(f"{backend}: no baseline trained")
            continue
        history = json.loads(record.read_text())["history"]
        images = len_train(workspace)
        seconds = statistics.median(h["epoch_seconds"] for h in history[1:] or history)
        rates[backend] = images / seconds
        job = train_seconds(workspace, backend, model)
        print(
            f"{backend:>10} training: {rates[backend]:7.0f} images/s ({seconds:.1f} s/epoch, "
            f"median of epochs 2..{len(history)}); best val top-1 "
            f"{max(h['val_top1'] for h in history):.4f}; train job {job or 0:.0f} s"
        )
    if len(rates) == 2:
        print(f"TensorFlow / PyTorch training throughput: {rates[TF] / rates['torch']:.2f}x")


def len_train(workspace: Path) -> int:
    manifest = json.loads((workspace / dag.prepared_dir("digits") / "manifest.json").read_text())
    return int(manifest["counts"]["train"])


def print_schedules(rows: dict) -> None:
    dense = rows["dense"]
    print(f"tfmot schedules, fine-tuned (dense test top-1 {dense['top1']:.4f}):")
    print(f"  {'schedule':<20}" + "".join(f"{s:>22.0%}" for s in SPARSITIES))
    for method in SCHEDULES:
        cells = []
        for sparsity in SPARSITIES:
            row = rows[f"{method} {sparsity}"]
            cells.append(
                "not measured"
                if row is None
                else f"{row['top1']:.4f} ({100 * (row['top1'] - dense['top1']):+.1f} pt)"
            )
        print(f"  {method:<20}" + "".join(f"{c:>22}" for c in cells))


def print_tflite(rows: dict, workspace: Path) -> None:
    dense = rows["dense"]
    print(
        f"TFLite formats (dense Keras file {dense['size_bytes']:,} bytes, gzip "
        f"{dense['gzip_bytes']:,}, top-1 {dense['top1']:.4f}, batch-1 {dense['latency_ms_b1']:.2f}"
        " ms):"
    )
    print(f"  {'model':<22}{'bytes':>12}{'gzip':>12}{'top-1':>9}{'d pt':>7}{'b1 ms':>8}")
    for name in [*TFLITE, *(f"sparse {q}" for q in SPARSE_TFLITE)]:
        row = rows[name]
        if row is None:
            continue
        print(
            f"  {name:<22}{row['size_bytes']:>12,}{row['gzip_bytes']:>12,}{row['top1']:>9.4f}"
            f"{100 * (row['top1'] - dense['top1']):>+7.1f}{row['latency_ms_b1']:>8.2f}"
        )


def print_size_factors(rows: dict) -> None:
    """Where the size goes, each step against the dense Keras file (gzip bytes, as the reference
    study compared): pruning alone, the TFLite container, int8 weights, then both."""
    dense = rows["dense"]["gzip_bytes"]
    steps = [
        ("dense .keras, gzip", rows["dense"]),
        (f"{SPARSE_POINT[1]:.0%} pruned .keras, gzip", rows[" ".join(map(str, SPARSE_POINT))]),
        ("dense float32 .tflite, gzip", rows["float32"]),
        ("dense dynamic-range int8, gzip", rows["dynamic_int8"]),
        ("dense full int8, gzip", rows["static_int8"]),
        (f"{SPARSE_POINT[1]:.0%} pruned dynamic-range int8, gzip", rows["sparse dynamic_int8"]),
        (f"{SPARSE_POINT[1]:.0%} pruned full int8, gzip", rows["sparse static_int8"]),
    ]
    print("Where the factor comes from (gzip bytes; smaller-by factor against the dense .keras):")
    for label, row in steps:
        if row is not None:
            print(f"  {label:<40}{row['gzip_bytes']:>12,}  {dense / row['gzip_bytes']:6.2f}x")


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def report_targets(rows: dict) -> None:
    float32, int8, dense = rows["float32"], rows["static_int8"], rows["dense"]
    if float32 is not None and int8 is not None:
        share = int8["size_bytes"] / float32["size_bytes"]
        drop = 100 * (int8["top1"] - float32["top1"])
        print(
            f"target: TFLite int8 <= {INT8_SIZE_TARGET}x float32 .tflite bytes -- {share:.3f}x "
            f"({verdict(share <= INT8_SIZE_TARGET)}); top-1 {drop:+.1f} pt within "
            f"{INT8_MAX_DROP_PT} pt ({verdict(drop >= -INT8_MAX_DROP_PT)})"
        )
    pruned = rows[f"gradual_polynomial {SPARSITIES[0]}"]
    if pruned is not None:
        drop = 100 * (pruned["top1"] - dense["top1"])
        print(
            f"target: {SPARSITIES[0]:.0%} polynomial, fine-tuned, within {PRUNED_MAX_DROP_PT} pt "
            f"of dense -- {drop:+.1f} pt, measured sparsity {pruned['measured_sparsity']:.3f} "
            f"({verdict(drop >= -PRUNED_MAX_DROP_PT)})"
        )


if __name__ == "__main__":
    with recorded("tensorflow"):
        main()
