"""Snakemake and `shrinkflow validate` read params the same way (issue 14).

Each case writes a params.yaml (and maybe a preset) into a copy of the workflow files, then asks
both doors: a dry run `snakemake -n` and `load_params`, which every CLI command (`validate`
included) calls. They must agree: both accept, or both stop with the same one-line `error:`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shrinkflow.config import load_params
from shrinkflow.errors import ShrinkflowError

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
PARAMS = (ROOT / "params.yaml").read_text()


def workflow_copy(dest: Path, params: str) -> Path:
    """The files a dry run reads (Snakefile, workflow/), with ``params`` as params.yaml."""
    shutil.copy(ROOT / "Snakefile", dest / "Snakefile")
    shutil.copytree(ROOT / "workflow", dest / "workflow", symlinks=True)
    (dest / "params.yaml").write_text(params)
    return dest


def dry_run(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SNAKEMAKE), "-n", "--cores", "1", *args],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
    )


def validate(project: Path, *files: str) -> str:
    """What `shrinkflow validate` prints to stderr: "" when the params are valid."""
    try:
        load_params([project / "params.yaml", *(project / f for f in files)])
    except ShrinkflowError as exc:
        return f"error: {exc}"
    return ""


def snakemake_verdict(result: subprocess.CompletedProcess) -> str:
    """An empty string for a dry run that succeeded, else its one `error:` line (asserting it
    is the only thing it printed: no traceback, no Snakemake exception)."""
    if result.returncode == 0:
        return ""
    assert "Traceback" not in result.stderr and "Error in" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0].replace(str(result.args[0]), "")


def _with(old: str, new: str) -> str:
    assert PARAMS.count(old) == 1, old
    return PARAMS.replace(old, new)


CASES = {
    # YAML 1.1 (PyYAML, which Snakemake uses) reads 1e-4 as text; shrinkflow reads a number.
    "exponent_without_dot": (_with("weight_decay: 5.0e-4", "weight_decay: 1e-4"), ""),
    "nan": (_with("lr: 0.05 ", "lr: .nan "), "error: train.lr: nan is not a finite number"),
    "float_integer": (
        _with("image_size: 32 ", "image_size: 16.0 "),
        "error: data.image_size: 16.0 is not of type integer",
    ),
    "mixed_keys": (PARAMS + "1: a\n", "error: params: key 1 is not text"),
    "unicode_digit": (
        _with("methods: [static_int8, fixed_w4]", "methods: [static_int8, fixed_w٤]"),
        "error: quantize.methods[1]: 'fixed_w٤' is not a quantization method",
    ),
    "syntax_error": (PARAMS + "train: [1, 2\n", "error: {params}: line "),
    "empty_file": ("# nothing yet\n", "error: {params}: empty"),
    "bad_tracking_uri": (
        _with("uri: null ", "uri: foo://host/x "),
        "error: tracking.uri: 'foo://host/x' has scheme 'foo'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_snakemake_and_validate_agree_on_params_yaml(tmp_path, case):
    params, expected = CASES[case]
    project = workflow_copy(tmp_path, params)
    expected = expected.format(params=project / "params.yaml")
    from_validate = validate(project)
    from_snakemake = snakemake_verdict(dry_run(project))
    assert from_validate.startswith(expected), from_validate
    assert "\n" not in from_validate
    # Snakemake names the file as it was given (relative to its working directory)
    assert from_snakemake == from_validate.replace(str(project) + "/", ""), from_snakemake


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("train: {weight_decay: 1e-4}\n", ""),
        ("train: {lr: .inf}\n", "error: train.lr: inf is not a finite number"),
        ("1: a\nfoo: b\n", "error: params: key 1 is not text"),
    ],
)
def test_snakemake_and_validate_agree_on_a_configfile_preset(tmp_path, preset, expected):
    project = workflow_copy(tmp_path, PARAMS)
    (project / "preset.yaml").write_text(preset)
    from_validate = validate(project, "preset.yaml")
    assert from_validate.startswith(expected), from_validate
    from_snakemake = snakemake_verdict(dry_run(project, "--configfile", "preset.yaml"))
    assert from_snakemake == from_validate, from_snakemake


def test_a_bad_tracking_uri_in_the_environment_stops_snakemake_in_one_line(tmp_path):
    import os

    project = workflow_copy(tmp_path, PARAMS)
    env = {**os.environ, "MLFLOW_TRACKING_URI": "foo://host/x"}
    verdict = snakemake_verdict(dry_run(project, env=env))
    assert verdict.startswith("error: MLFLOW_TRACKING_URI: 'foo://host/x' has scheme 'foo'")


def test_config_lists_of_numbers_reach_the_jobs_as_numbers(tmp_path):
    """`--config 'seeds=[0,1]'`: Snakemake reads list items as text; the jobs see integers."""
    project = workflow_copy(tmp_path, PARAMS)
    result = dry_run(project, "--config", "seeds=[0,1]", "backends=[torch]", "-p")
    assert result.returncode == 0, result.stderr
    assert "--set 'seeds=[0, 1]'" in result.stdout
    assert "results/models/torch/resnet20/seed1/baseline/model" in result.stdout
