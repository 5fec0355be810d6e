"""Float against int8 and fixed-point weights, and pruning + int8, measured side by side.

Run from the project root inside the virtualenv:

    python benchmarks/quantization.py [--models resnet20 resnet18] [--epochs 8] [--cores 2]

Runs the DAG through Snakemake in a fresh workspace (benchmarks/out/quantization) on the default
digits data at 32x32: each model is trained for --epochs, quantized from its baseline with
static_int8, dynamic_int8 and qat_int8 (and, for the --fixed-models, with fixed-point weights of
every --fixed-bits width: where accuracy breaks), and pruned to 80 % sparsity (--prune-method),
fine-tuned and quantized with static_int8. Snakemake builds exactly those nodes (their
metrics.json are its targets): `quantize.methods` applies to every source, so `rule all` would
also quantize the sparse point with every method.

It prints, per model: test top-1 and its change from the float baseline; file bytes, gzip bytes
and tensor bytes (the file's tensors without its container, e.g. without the graph JSON of a
torch.export .pt2, a few hundred KB whatever the model) as ratios to the float file's; batch-1
latency and throughput with their speed-ups over the float model timed in the same evaluate
process. Then the 80 % sparse + int8 figures, the targets (met or missed, never hidden) and the
wall time of the run. A ResNet-18 epoch takes ~25 s on 2 cores; the defaults aim at ~20 min.

Timings are clean only while one job runs at a time on a quiet machine: every rule declares 2
threads, so keep --cores at 2 when the latencies matter. `--reuse` continues a killed run in its
workspace.
"""

from __future__ import annotations

import argparse
import subprocess
import time
import zipfile
from pathlib import Path

import yaml
from figures import recorded
from workspace import BIN, ROOT, failure, fresh_workspace, read_metrics, train_seconds

from shrinkflow import dag

BACKEND = "torch"
INT8 = ["static_int8", "dynamic_int8", "qat_int8"]
# The int8 methods the size, accuracy and latency targets are about: dynamic_int8 quantizes
# only Linear layers, so a CNN stays float where it matters (its row is shown for contrast).
TARGETED = ["static_int8", "qat_int8"]
SPARSITY = 0.8
SPARSE_QMETHOD = "static_int8"
# int8 weights are a quarter of float32 ones; 0.27 leaves room for scales, biases and container.
SIZE_TARGET, SIZE_FLOOR = 0.27, 0.25
MAX_DROP_PT = 0.5
LATENCY_TARGET, LATENCY_MODEL = 0.5, "resnet18"
SPARSE_GZIP_TARGET = 0.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet18"])
    parser.add_argument(
        "--epochs", type=int, default=8, help="baseline training epochs (params.yaml: 8)"
    )
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument(
        "--fixed-models", nargs="*", default=["resnet20"], help="models that get the fixed sweep"
    )
    parser.add_argument("--fixed-bits", type=int, nargs="*", default=[16, 8, 6, 4, 2])
    parser.add_argument(
        "--prune-method",
        choices=["l1_unstructured", "gradual_polynomial"],
        default="l1_unstructured",
        help="how the 80 %% sparse model is made (one-shot is the cheaper)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="continue in the existing workspace (a killed run)"
    )
    args = parser.parse_args()
    fixed = [f"fixed_w{bits}" for bits in args.fixed_bits]
    workspace = ROOT / "benchmarks/out/quantization"
    if not (args.reuse and workspace.is_dir()):
        fresh_workspace(workspace)
    config = {
        "backends": [BACKEND],  # qat_int8 is torch's: a backend without it is refused
        "models": args.models,
        "train": {"epochs": args.epochs},
        "prune": {"methods": [args.prune_method], "sparsities": [SPARSITY]},
        "sensitivity": {"ratios": []},
        "quantize": {"methods": INT8 + fixed},
    }
    (workspace / "bench.yaml").write_text(yaml.safe_dump(config))
    plan = {model: nodes(model, args, fixed) for model in args.models}
    targets = [str(node.metrics) for by_name in plan.values() for node in by_name.values()]
    # --keep-going: a node that fails (its error is in its log) must not stop the others; it is
    # listed below with its reason.
    start = time.perf_counter()
    run = subprocess.run(
        [str(BIN / "snakemake"), "--cores", str(args.cores), "--configfile", "bench.yaml",
         "--keep-going", *targets],
        cwd=workspace, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    (workspace / "snakemake.log").write_text(run.stdout + run.stderr)
    print(
        f"digits 32x32, {BACKEND}, train {args.epochs} epoch(s), {len(targets)} evaluated nodes: "
        f"{seconds:.0f} s wall with --cores {args.cores} (snakemake exit {run.returncode})"
    )
    results = {
        model: {name: read_metrics(workspace, node) for name, node in by_name.items()}
        for model, by_name in plan.items()
    }
    for model, rows in results.items():
        print()
        print_model(model, rows, workspace, train_seconds(workspace, BACKEND, model), args.epochs)
    print()
    print_sparse(results, args.prune_method)
    print()
    report_targets(results, workspace)
    for model, by_name in plan.items():
        for name, node in by_name.items():
            if results[model][name] is None:
                print(f"not measured: {model} {name}: {failure(workspace, node)}")


def nodes(model: str, args: argparse.Namespace, fixed: list[str]) -> dict[str, dag.Node]:
    """The nodes this benchmark reads for ``model``, by the name its tables show."""
    base = dag.baseline(BACKEND, model)
    sparse = dag.finetuned(BACKEND, model, args.prune_method, SPARSITY)
    qmethods = INT8 + (fixed if model in args.fixed_models else [])
    return {
        "float": base,
        **{q: dag.quantized(BACKEND, model, q, base) for q in qmethods},
        "sparse": sparse,
        "sparse+int8": dag.quantized(BACKEND, model, SPARSE_QMETHOD, sparse),
    }


def model_file(workspace: Path, row: dict) -> Path:
    folder = workspace / row["artifact"]
    pt2 = folder / "model.pt2"
    return pt2 if pt2.is_file() else folder / "model.pt"


def tensor_bytes(path: Path) -> int:
    """Bytes of the tensors a model file stores (weights, codes, scales, biases, buffers).

    Both file kinds are zip archives: torch.save keeps each tensor in ``data/<n>`` beside a
    pickle; torch.export keeps them in ``data/weights/`` and ``data/constants/`` beside the graph
    JSON, configs and sample inputs, the container overhead this leaves out.
    """
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            saved = len(parts) >= 2 and parts[-2] == "data" and parts[-1].isdigit()
            exported = (
                len(parts) >= 3
                and parts[-3] == "data"
                and parts[-2] in ("weights", "constants")
                and not parts[-1].endswith(".json")
            )
            total += info.file_size if saved or exported else 0
    return total


def print_model(
    model: str, rows: dict, workspace: Path, seconds: float | None, epochs: int
) -> None:
    base = rows["float"]
    if base is None:
        print(f"{model}: no float baseline, nothing to compare")
        return
    trained = f", train job {seconds:.0f} s for {epochs} epoch(s)" if seconds else ""
    print(
        f"{model}: {base['params'] / 1e6:.2f} M params{trained}; float test top-1 "
        f"{base['top1']:.4f}, {base['size_bytes']:,} bytes"
    )
    base_tensors = tensor_bytes(model_file(workspace, base))
    header = (
        f"{'method':<13} {'top-1':>6} {'Δ pt':>6} {'file bytes':>11} {'×':>5} "
        f"{'gzip bytes':>11} {'×':>5} {'tensors':>11} {'×':>5} {'b1 ms':>7} {'float':>7} "
        f"{'speed-up':>8} {'img/s':>7} {'speed-up':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        if row is None or name.startswith("sparse"):
            continue
        tensors = tensor_bytes(model_file(workspace, row))
        # The float row has no reference: it is the reference, at 1.00x.
        float_ms = row.get("reference_latency_ms_b1", row["latency_ms_b1"])
        print(
            f"{name:<13} {row['top1']:>6.4f} {100 * (row['top1'] - base['top1']):>+6.1f} "
            f"{row['size_bytes']:>11,} {row['size_bytes'] / base['size_bytes']:>4.2f}x "
            f"{row['gzip_bytes']:>11,} {row['gzip_bytes'] / base['gzip_bytes']:>4.2f}x "
            f"{tensors:>11,} {tensors / base_tensors:>4.2f}x "
            f"{row['latency_ms_b1']:>7.2f} {float_ms:>7.2f} "
            f"{row.get('latency_speedup', 1.0):>7.2f}x "
            f"{row['throughput_ips']:>7.0f} {row.get('throughput_speedup', 1.0):>7.2f}x"
        )
    print(
        f"× = ratio to the float file; tensors = the file's tensor bytes without its container; "
        f"b1 ms = median batch-1 latency, float = the float model's timed in the same process; "
        f"img/s at batch {base['throughput_batch']}, speed-up over the float model's likewise"
    )


def print_sparse(results: dict, prune_method: str) -> None:
    print(
        f"{SPARSITY:.0%} sparse ({prune_method}, fine-tuned) + {SPARSE_QMETHOD}, "
        "against the dense float baseline:"
    )
    for model, rows in results.items():
        base, sparse, combined = rows["float"], rows["sparse"], rows["sparse+int8"]
        if base is None or combined is None:
            continue
        sparse_top1 = f"{sparse['top1']:.4f}" if sparse else "n/a"
        print(
            f"  {model}: measured sparsity {combined['measured_sparsity']:.3f}; top-1 dense "
            f"{base['top1']:.4f}, sparse float {sparse_top1}, sparse int8 {combined['top1']:.4f} "
            f"({100 * (combined['top1'] - base['top1']):+.1f} pt); gzip {combined['gzip_bytes']:,}"
            f" bytes = {combined['gzip_bytes'] / base['size_bytes']:.3f}x the dense float file "
            f"({base['size_bytes']:,} bytes)"
        )


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def report_targets(results: dict, workspace: Path) -> None:
    """The targets, with what this run measured: met or missed, never hidden."""
    for model, rows in results.items():
        base = rows["float"]
        if base is None:
            continue
        base_tensors = tensor_bytes(model_file(workspace, base))
        int8 = {q: rows[q] for q in TARGETED if rows[q] is not None}
        for q, row in int8.items():
            tensors = tensor_bytes(model_file(workspace, row)) / base_tensors
            gzip = row["gzip_bytes"] / base["gzip_bytes"]
            print(
                f"target: int8 file <= {SIZE_TARGET}x float ({SIZE_FLOOR}x is the floor) -- "
                f"{model} {q}: {row['size_ratio']:.3f}x "
                f"({verdict(row['size_ratio'] <= SIZE_TARGET)}); "
                f"tensors alone {tensors:.3f}x, gzip {gzip:.3f}x"
            )
        for q, row in int8.items():
            change = 100 * (row["top1"] - base["top1"])
            print(
                f"target: int8 top-1 within {MAX_DROP_PT} pt of float -- {model} {q}: "
                f"{change:+.1f} pt ({verdict(change >= -MAX_DROP_PT)})"
            )
        if model == LATENCY_MODEL:
            for q, row in int8.items():
                share = row["latency_ms_b1"] / row["reference_latency_ms_b1"]
                print(
                    f"target: CPU batch-1 latency <= {LATENCY_TARGET}x float -- {model} {q}: "
                    f"{row['latency_ms_b1']:.2f} ms against {row['reference_latency_ms_b1']:.2f}"
                    f" ms = {share:.2f}x ({verdict(share <= LATENCY_TARGET)})"
                )
        combined = rows["sparse+int8"]
        if combined is not None:
            share = combined["gzip_bytes"] / base["size_bytes"]
            print(
                f"target: {SPARSITY:.0%} sparse + int8 gzip <= {SPARSE_GZIP_TARGET:.2f}x dense "
                f"float file -- {model}: {share:.3f}x ({verdict(share <= SPARSE_GZIP_TARGET)}), "
                f"top-1 {100 * (combined['top1'] - base['top1']):+.1f} pt"
            )
    if LATENCY_MODEL not in results:
        print(f"target: CPU batch-1 latency <= {LATENCY_TARGET}x float -- {LATENCY_MODEL} not run")


if __name__ == "__main__":
    with recorded("quantization"):
        main()
