"""Every stage's bad input: one line naming the key or file, exit 2, and nothing written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHRINKFLOW = str(Path(sys.executable).parent / "shrinkflow")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def shrinkflow(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SHRINKFLOW, *args], cwd=project, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "--backend", "torch", "--model", "nope", "--in", "d", "--out", "m"],
            "error: model: 'nope' is not available for backend torch (known: googlenet,",
        ),
        (
            ["train", "--backend", "jax", "--model", "resnet20", "--in", "d", "--out", "m"],
            "error: backend: 'jax' is not one of torch",
        ),
        (
            ["train", "--backend", "torch", "--model", "resnet20", "--in", "d", "--out", "m"],
            "error: d/manifest.json: missing; run `shrinkflow prepare`",
        ),
        (["prepare", "--in", "raw", "--out", "p"], "error: --in raw: no such folder"),
        (
            ["evaluate", "--in", ".", "--data", "d", "--out", "m.json"],
            "error: --in .: not a model folder (no node.json)",
        ),
        (
            ["summarize", "--models", "results/models", "--out", "s.csv"],
            "error: results/models/torch/resnet20/seed0/baseline/metrics.json: missing",
        ),
        (
            [
                "download",
                "--set",
                "data.name=imagefolder",
                "--set",
                "data.root=nowhere",
                "--out",
                "raw",
            ],
            "error: data.root: nowhere is not a folder",
        ),
        (
            [
                "download",
                "--set",
                "data.name=cifar10",
                "--set",
                "data.root=nowhere",
                "--out",
                "raw",
            ],
            "error: data.root: nowhere is not a folder",
        ),
        (["download", "--set", "train.epochs=0", "--out", "raw"], "error: train.epochs: 0 is not"),
        (["validate", "--params", "missing.yaml"], "error: missing.yaml: cannot read"),
        (
            [
                "prune",
                "--method",
                "l2",
                "--sparsity",
                "0.5",
                "--in",
                "m",
                "--data",
                "d",
                "--sensitivity",
                "s",
                "--out",
                "p",
            ],
            "error: --method: 'l2' is not one of l1_unstructured, gradual_polynomial,",
        ),
        (
            [
                "prune",
                "--method",
                "l1_unstructured",
                "--sparsity",
                "1.5",
                "--in",
                "m",
                "--data",
                "d",
                "--sensitivity",
                "s",
                "--out",
                "p",
            ],
            "error: --sparsity: 1.5 is not in [0, 1)",
        ),
        (
            [
                "prune",
                "--method",
                "l1_unstructured",
                "--sparsity",
                "0.5",
                "--in",
                "m",
                "--data",
                "d",
                "--sensitivity",
                "s",
                "--out",
                "p",
            ],
            "error: --in m: not a model folder (no node.json)",
        ),
        (
            ["finetune", "--in", "m", "--data", "d", "--out", "f"],
            "error: --in m: not a model folder (no node.json)",
        ),
        (
            ["sensitivity", "--in", "m", "--data", "d", "--out", "s"],
            "error: --in m: not a model folder (no node.json)",
        ),
        (
            [
                "validate",
                "--set",
                "prune.methods=[structured_sensitivity]",
                "--set",
                "sensitivity.ratios=[]",
            ],
            "error: sensitivity.ratios: empty, but prune.methods has structured_sensitivity",
        ),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(project, args, message):
    result = shrinkflow(project, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    leftovers = sorted(p.name for p in project.iterdir())
    assert leftovers == ["params.yaml"], f"bad input wrote {leftovers}"


def test_imagefolder_with_an_empty_class_fails_before_any_run(project):
    images = project / "images"
    (images / "cats").mkdir(parents=True)
    (images / "dogs").mkdir()
    from PIL import Image

    Image.new("RGB", (12, 10), "red").save(images / "cats" / "a.png")
    result = shrinkflow(
        project,
        "download",
        "--set",
        "data.name=imagefolder",
        "--set",
        "data.root=images",
        "--out",
        "raw",
    )
    assert result.returncode == 2
    assert "dogs" in result.stderr and result.stderr.count("\n") == 1
    assert not (project / "mlflow.db").exists() and not (project / "raw").exists()


def test_help_lists_every_stage():
    result = subprocess.run([SHRINKFLOW, "--help"], capture_output=True, text=True)
    stages = ["download", "prepare", "train", "sensitivity", "prune", "finetune", "evaluate"]
    for stage in [*stages, "summarize", "models", "validate"]:
        assert stage in result.stdout
