"""Synthetic results/summary.csv files for the report's tests and benchmark (no training)."""

from __future__ import annotations

import csv
import hashlib
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
) -> list[dict]:
    """Rows shaped like a real sweep's: accuracy falls with sparsity and bits, gzip size falls
    with sparsity, int8 is ~4x smaller and faster. Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    rows = []
    for backend in backends:
        for model in models:
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
                float_row = _row(
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
                )
                rows.append(float_row)
                for q in qmethods:
                    factor, extra_loss, speed = (
                        (0.26, 0.002, 0.5) if "int8" in q else (0.14, 0.01, 1.0)
                    )
                    rows.append(
                        _row(
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
                        )
                    )
    return rows


def _row(backend, model, stage, method, sparsity, qmethod, params, kept, top1, gzip, latency, rng):
    label = f"{backend}/{model}/{stage}"
    return {
        "backend": backend,
        "model": model,
        "stage": stage,
        "prune_method": method,
        "target_sparsity": "" if sparsity is None else sparsity,
        "measured_sparsity": round(1 - kept + rng.uniform(-0.002, 0.002), 4) if sparsity else 0.0,
        "quant_method": qmethod,
        "top1": round(float(top1), 4),
        "top5": round(min(1.0, float(top1) + 0.02), 4),
        "params": params,
        "nonzero_params": int(params * kept),
        "macs": 40_550_000,
        "size_bytes": int(params * 4.2 * (0.26 if "int8" in qmethod else 1.0)),
        "gzip_bytes": int(gzip),
        "latency_ms_b1": round(latency * rng.uniform(0.95, 1.05), 3),
        "throughput_ips": round(1000 / latency * 8, 1),
        "peak_mem_mb": round(30 + rng.uniform(0, 5), 2),
        "run_id": hashlib.md5(f"{label}/{method}/{sparsity}/{qmethod}".encode()).hexdigest(),
        "artifact": f"results/models/{label}/model",
    }


def write_summary(path: Path, rows: list[dict], columns: tuple[str, ...] = SUMMARY_COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
