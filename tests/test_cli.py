"""What a user meets at the command line: every stage's bad input (one line naming the key or
file, exit 2, and nothing written), --version, the choices in each option's help, and stderr
without TensorFlow's start-up lines."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shrinkflow.backends.base import (
    BACKENDS,
    PRUNE_METHODS,
    REGISTRY_MODELS,
    check_quant_method,
    quant_methods,
)
from shrinkflow.backends.native_log import filtered_stderr, startup_lines_kept
from shrinkflow.cli import app
from shrinkflow.quantization import MAX_BITS, MIN_BITS

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
            "error: --model: 'nope' is neither a torch registry model (googlenet,",
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


def test_version_is_the_installed_distributions():
    result = subprocess.run([SHRINKFLOW, "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"shrinkflow {metadata.version('shrinkflow')}\n"


def help_text(*args: str) -> str:
    """``shrinkflow <args> --help`` with the table borders and line breaks taken out."""
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


MODELS = sorted(set().union(*REGISTRY_MODELS.values()))


@pytest.mark.parametrize(
    ("command", "listed"),
    [
        (["train"], [f"One of: {', '.join(BACKENDS)}.", ", ".join(MODELS)]),
        (["models"], [f"One of: {', '.join(BACKENDS)}."]),
        (["prune"], [f"{b}: {', '.join(PRUNE_METHODS[b])}" for b in BACKENDS]),
        (
            ["quantize"],
            [f"{b}: {', '.join(quant_methods(b))}" for b in BACKENDS]
            + [f"<bits> from {MIN_BITS} to {MAX_BITS}"],
        ),
    ],
)
def test_help_lists_every_choice_of_every_option(command, listed):
    """The values come from where they are defined: backends.base, the schema's model enum."""
    text = help_text(*command)
    for choices in listed:
        assert choices in text, text


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_quantize_method_in_the_help_runs_on_its_backend(backend):
    for name in quant_methods(backend):
        for bits in (MIN_BITS, MAX_BITS) if name.endswith("<bits>") else (None,):
            check_quant_method(backend, name.replace("<bits>", str(bits)), key="--method")


# What TensorFlow 2.21 writes to stderr while it loads on a machine without a GPU and TFLite
# while it converts and starts (shortened), around two lines a job must still show: an error of
# its own and a Python warning.
STARTUP = """\
fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: FLOAT32
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796668879.390476   20271 port.cc:153] oneDNN custom operations are on.
I0000 00:00:1796668879.391097   20271 cudart_stub.cc:31] Could not find cuda drivers on your \
machine, GPU will not be used.
W0000 00:00:1796668879.391097   20271 some.cc:1] a warning
E0000 00:00:1796668893.191316   20271 op_kernel.cc:9] a real error
/x/y.py:3: UserWarning: a Python warning
E0000 00:00:1796668902.523658   20271 cuda_platform.cc:52] failed call to cuInit: INTERNAL: \
CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""
REAL = [
    "E0000 00:00:1796668893.191316   20271 op_kernel.cc:9] a real error\n",
    "/x/y.py:3: UserWarning: a Python warning\n",
]


def test_tensorflow_startup_lines_are_dropped_and_errors_kept():
    assert startup_lines_kept(STARTUP, 2) == "".join(REAL)
    assert startup_lines_kept(STARTUP, 3) == REAL[1]  # as TF_CPP_MIN_LOG_LEVEL=3 hides errors
    assert startup_lines_kept(STARTUP, 0) == STARTUP  # the user asked for everything
    warning = "W0000 00:00:1796668879.391097   20271 some.cc:1] a warning\n"
    assert startup_lines_kept(STARTUP, 1).splitlines(keepends=True) == [warning, *REAL]


def test_a_cuinit_failure_on_a_machine_with_a_gpu_is_kept():
    broken = (
        "E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
        "Failed call to cuInit: CUDA_ERROR_SYSTEM_DRIVER_MISMATCH\n"
    )
    assert startup_lines_kept(broken, 2) == broken
    no_device = broken.replace("CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", "CUDA_ERROR_NO_DEVICE")
    assert startup_lines_kept(no_device, 2) == ""


def test_filtered_stderr_writes_back_what_is_kept(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with pytest.raises(RuntimeError), filtered_stderr():
        os.write(2, STARTUP.encode())
        raise RuntimeError("the import failed")
    assert capfd.readouterr().err == "".join(REAL)
