"""A fresh copy of the project for benchmarks: no outputs, no MLflow store, its own git repo."""

from __future__ import annotations

import shutil
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
    """Wall seconds of one command; exits with its output if it fails."""
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed
