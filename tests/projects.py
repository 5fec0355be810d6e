"""Helpers shared by the tests that run the DAG for real: a throw-away copy of the project with
tiny params, running its tools, and reading what a run left (summary, MLflow runs, job stats)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's snakemake, dvc and shrinkflow
TINY = {  # the smallest DAG that still exercises every stage and every pruning family
    "data": {"image_size": 8},
    "train": {"epochs": 2, "batch_size": 128, "warmup_epochs": 0},
    "prune": {
        "methods": ["l1_unstructured", "gradual_polynomial", "structured_sensitivity"],
        "sparsities": [0.5],
    },
    "finetune": {"epochs": 1},
    "sensitivity": {"ratios": [0.25, 0.5], "max_drop": 1.0},  # every ratio passes: smoke only
    # PT2E int8 and fixed-point, on the baseline and every sweep point. QAT costs ~1 minute a
    # node (torchao's conv-bn folding), so it runs once, in tests/test_pipeline_e2e.py's
    # kill-and-resume test.
    "quantize": {
        "methods": ["static_int8", "fixed_w4"],
        "calibration_batches": 1,
        "qat": {"epochs": 1, "lr": 0.001},  # complete: the sections are updated shallowly
    },
    "evaluate": {"batch_sizes": [1, 32], "warmup": 1, "repeats": 3},
}


# What a checkout holds for the tools to run: the workflow, its profiles, DVC's files and the code.
CHECKOUT = ("Snakefile", "dvc.yaml", "workflow", "profiles", ".dvc", "src", ".dvcignore")


def copy_checkout(dest: Path, names: tuple[str, ...] = CHECKOUT) -> Path:
    """Copy ``names`` of the checkout into ``dest`` (without caches, DVC's tmp and build
    metadata); names the checkout lacks are skipped. Returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("tmp", "cache", "__pycache__", "*.egg-info")
    for name in names:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, symlinks=True, ignore=ignore)
        elif source.exists():
            shutil.copy(source, dest / name)
    return dest


def make_project(dest: Path, quantize_methods: list[str] | None = None, **sections: dict) -> Path:
    """A fresh checkout-like copy of the project (a git repository) with TINY written into
    params.yaml, the torch backend only (the structured methods are torch's;
    tests/test_pipeline_tf_e2e.py runs TensorFlow's DAG), ``quantize_methods`` instead of TINY's
    if given, and each of ``sections`` updated over its params section last."""
    copy_checkout(dest)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["prune"]["gradual"]["epochs"] = 1
    params["backends"] = ["torch"]
    if quantize_methods is not None:
        params["quantize"]["methods"] = quantize_methods
    for section, values in sections.items():
        params[section].update(values)
    write_params(dest, params)
    (dest / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def read_params(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())


def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def tool_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would give the tools: the venv first on PATH, MLflow's
    default store (no MLFLOW_TRACKING_URI) and no invocation id inherited from a caller."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SHRINKFLOW_INVOCATION_ID", None)
    return {**env, **extra}


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` with :func:`tool_env`; fail the test with its output's tail if it
    fails."""
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(**env), capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def read_summary(project: Path) -> list[dict]:
    with (project / "results/summary.csv").open() as handle:
        return list(csv.DictReader(handle))


# params.yaml's tracking.experiment: the evaluated artefacts' runs, and every other job's runs
EXPERIMENTS = ("shrinkflow", "shrinkflow-jobs")


def store_runs(uri: str, experiments: tuple[str, ...] = EXPERIMENTS) -> list:
    """Every run of ``experiments`` (default: both of shrinkflow's) in the store at ``uri``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = [client.get_experiment_by_name(name) for name in experiments]
    ids = [experiment.experiment_id for experiment in found if experiment is not None]
    return client.search_runs(ids, max_results=1000) if ids else []


def mlflow_runs(project: Path) -> list:
    """Every run of the project's default store (its mlflow.db), in both experiments."""
    return store_runs(f"sqlite:///{project / 'mlflow.db'}")


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's "Job stats" table (of a run or a dry run): jobs per rule."""
    table = output.split("Job stats:")[1].split("total")[0]
    rows = (line.split() for line in table.splitlines())
    return {words[0]: int(words[1]) for words in rows if len(words) == 2 and words[1].isdigit()}
