"""Synthetic results/summary.csv files for the report's tests and benchmark (no training)."""

from __future__ import annotations

import csv
import hashlib
import itertools
from pathlib import Path

import numpy as np

from shrinkflow.metrics import SUMMARY_COLUMNS


def summary_rows(
    backends: tuple[str, ...] = ("torch", "tensorflow"),
    models: tuple[str, ...] = ("resnet20",),
    methods: tuple[str, ...] = ("l1_unstructured", "gradual_polynomial"),
    sparsities: tuple[float, ...] = (0.5, 0.7),
    qmethods: tuple[str, ...] = ("static_int8", "fixed_w4"),
    seed: int = 0,
    seeds: tuple[int, ...] = (0,),
) -> list[dict]:
    """Rows shaped like a real sweep's: accuracy falls with sparsity and bits, gzip size falls
    with sparsity, int8 is ~4x smaller and faster; validation top-1 is test top-1 plus a little
    noise, and right after pruning (``pruned_val_top1``, on fine-tuned points and their quantized
    copies) it is lower than after fine-tuning; one chain per training seed in ``seeds``, each
    run in MLflow experiment 1 (the baselines) or 2. Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    rows = []
    for backend, model, training_seed in itertools.product(backends, models, seeds):
        params = 272_474 * (1 + models.index(model))
        base = {
            "top1": 0.97 - 0.01 * models.index(model),
            "gzip": params * 3.7 * (1 + 0.03 * backends.index(backend)),
        }
        sources = [("baseline", "", None, 0.0)]
        sources += [
            ("finetuned", m, s, s * (0.01 + 0.02 * i) + rng.uniform(0, 0.004))
            for i, m in enumerate(methods)
            for s in sparsities
        ]
        for stage, method, sparsity, loss in sources:
            kept = 1 - (sparsity or 0.0)
            pruned = None if sparsity is None else base["top1"] - 3 * loss - 0.05 * sparsity
            float_row = _row(
                training_seed,
                backend,
                model,
                stage,
                method,
                sparsity,
                "",
                params,
                kept,
                base["top1"] - loss,
                base["gzip"] * (0.1 + 0.9 * kept),
                1.2,
                rng,
                pruned_top1=pruned,
            )
            rows.append(float_row)
            for q in qmethods:
                factor, extra_loss, speed = (0.26, 0.002, 0.5) if "int8" in q else (0.14, 0.01, 1.0)
                rows.append(
                    _row(
                        training_seed,
                        backend,
                        model,
                        "quantized",
                        method,
                        sparsity,
                        q,
                        params,
                        kept,
                        float_row["top1"] - extra_loss,
                        float_row["gzip_bytes"] * factor,
                        1.2 * speed,
                        rng,
                        float_latency=float_row["latency_ms_b1"],
                        pruned_top1=pruned,
                    )
                )

    return rows


TEST_IMAGES, VAL_IMAGES = 360, 144  # digits' split sizes at the default fractions


def _row(
    seed,
    backend,
    model,
    stage,
    method,
    sparsity,
    qmethod,
    params,
    kept,
    top1,
    gzip,
    latency,
    rng,
    float_latency=None,
    pruned_top1=None,
):
    label = f"{backend}/{model}/seed{seed}/{stage}"
    top1 = float(top1) + rng.normal(0, 0.003)
    size = int(params * 4.2 * (0.26 if "int8" in qmethod else 1.0))
    bits = 8 if "int8" in qmethod else 4 if qmethod else 32
    latency = round(latency * rng.uniform(0.95, 1.05), 3)
    return {
        "backend": backend,
        "model": model,
        "seed": seed,
        "stage": stage,
        "prune_method": method,
        "target_sparsity": "" if sparsity is None else sparsity,
        "measured_sparsity": round(1 - kept + rng.uniform(-0.002, 0.002), 4) if sparsity else 0.0,
        "quant_method": qmethod,
        "top1": round(top1, 4),
        "val_top1": round(top1 + rng.normal(0, 0.005), 4),
        "pruned_val_top1": "" if pruned_top1 is None else round(pruned_top1, 4),
        "top5": round(min(1.0, top1 + 0.02), 4),
        "test_images": TEST_IMAGES,
        "val_images": VAL_IMAGES,
        "params": params,
        "nonzero_params": int(params * kept),
        "macs": 40_550_000,
        "size_bytes": size,
        "gzip_bytes": int(gzip),
        "nominal_bytes": int(params * kept * bits / 8),
        "sparse_bytes": int(params * (kept * bits / 8 + 1 / 8)),
        "sparse_gzip_bytes": int(params * (kept * bits / 8 + 1 / 8) * 0.9),
        "latency_ms_b1": latency,
        "throughput_ips": round(1000 / latency * 8, 1),
        "runtime": "tflite"
        if backend == "tensorflow" and "int8" in qmethod
        else "keras"
        if backend == "tensorflow"
        else "torch",
        "float_latency_ms_b1": "" if float_latency is None else float_latency,
        "speedup_b1": "" if float_latency is None else round(float_latency / latency, 4),
        "peak_mem_mb": round(30 + rng.uniform(0, 5), 2),
        "run_id": hashlib.md5(f"{label}/{method}/{sparsity}/{qmethod}".encode()).hexdigest(),
        "experiment_id": "1" if stage == "baseline" else "2",
        "artifact": f"results/models/{label}/model",
    }


def write_summary(path: Path, rows: list[dict], columns: tuple[str, ...] = SUMMARY_COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
