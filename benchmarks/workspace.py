"""A fresh copy of the project for benchmarks: no outputs, no MLflow store, its own git repo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from shrinkflow import dag

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


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one command (in ``env``, default this one's); exits with its output
    if it fails."""
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed


def read_metrics(workspace: Path, node: dag.Node) -> dict | None:
    """The node's metrics.json, or None if its job did not produce it."""
    path = workspace / node.metrics
    return json.loads(path.read_text()) if path.is_file() else None


def failure(workspace: Path, node: dag.Node) -> str:
    """The error line of the job that should have made ``node``, if its log has one."""
    logs = [Path("logs/evaluate") / f"{node.label}.log"]
    if node.stage == "quantized":
        source = node.source.subpath
        logs.append(
            Path("logs/quantize", node.backend, node.model, node.quant_method, f"{source}.log")
        )
    for log in logs:
        path = workspace / log
        lines = path.read_text().splitlines() if path.is_file() else []
        errors = [line for line in lines if line.startswith("error:")]
        if errors:
            return f"{errors[-1]} ({log})"
    return f"not produced (an upstream job failed? see {workspace / 'snakemake.log'})"


def train_seconds(workspace: Path, backend: str, model: str) -> float | None:
    """Wall seconds of the model's train job, from its Snakemake benchmark file."""
    tsv = workspace / "logs/benchmark/train" / backend / f"{model}.tsv"
    if not tsv.is_file():
        return None
    header, values = tsv.read_text().splitlines()[:2]
    return float(dict(zip(header.split("\t"), values.split("\t"), strict=True))["s"])
