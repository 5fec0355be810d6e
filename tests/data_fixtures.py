"""Helpers shared by the tests: data-stage configs, file snapshots, and a PreparedData in a file
(so a worker process can train on exactly the test's data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shrinkflow.data.prepared import PreparedData


def make_cfg(
    name: str,
    *,
    root: Path | None = None,
    mirror: str | None = None,
    image_size: int = 16,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """The parts of a validated params dict the data stages read (see params.yaml)."""
    return {
        "seed": seed,
        "data": {
            "name": name,
            "root": None if root is None else str(root),
            "image_size": image_size,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "mirror": mirror,
        },
    }


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, for byte-for-byte comparisons."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def load_data_file(path: Path) -> PreparedData:
    """The PreparedData a test wrote with ``np.savez`` (its arrays, classes, mean, std and
    fingerprint), loaded without pickles."""
    with np.load(path, allow_pickle=False) as a:
        return PreparedData(
            images=a["images"],
            labels=a["labels"],
            train=a["train"],
            val=a["val"],
            test=a["test"],
            classes=[str(c) for c in a["classes"]],
            mean=tuple(float(m) for m in a["mean"]),
            std=tuple(float(s) for s in a["std"]),
            manifest={"fingerprint": str(a["fingerprint"])},
        )
