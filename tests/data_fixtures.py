"""Helpers shared by the tests/test_data_*.py files."""

from __future__ import annotations

from pathlib import Path


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
