"""Snakemake and DVC must run the same `shrinkflow` commands (DESIGN.md section 1)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake_commands(*extra: str, cwd: Path = ROOT) -> list[str]:
    """The shell commands of every job, from a forced dry run (`snakemake -n -p --forceall`)."""
    result = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "2", *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    commands = re.findall(r"^Shell command: (shrinkflow .*)$", result.stdout, re.MULTILINE)
    # Snakemake sends each job's stderr to its log file; DVC leaves it on the terminal.
    return sorted(re.sub(r" 2> \S+$", "", c) for c in commands)


def dvc_commands(cwd: Path = ROOT) -> list[str]:
    """The resolved `cmd` of every stage (after matrix expansion and templating)."""
    from dvc.repo import Repo

    with Repo(str(cwd)) as repo:
        return sorted(" ".join(stage.cmd.split()) for stage in repo.index.stages)


def test_snakemake_and_dvc_run_the_same_commands():
    smk = snakemake_commands()
    dvc = dvc_commands()
    assert smk == dvc
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    points = len(params["prune"]["methods"]) * len(params["prune"]["sparsities"])
    stages = [c.split()[1] for c in smk]
    assert {stage: stages.count(stage) for stage in stages} == {
        "download": 1,
        "prepare": 1,
        "train": 1,
        "sensitivity": 1,
        "prune": points,
        "finetune": points,
        "evaluate": 1 + points,
        "summarize": 1,
    }


def test_parity_holds_for_a_sweep_over_models(tmp_path):
    """Both expand backends x models from params.yaml; a second model adds the same jobs."""
    for name in ["Snakefile", "dvc.yaml", "workflow", ".dvc", "src"]:
        source = ROOT / name
        target = tmp_path / name
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("tmp"))
        else:
            shutil.copy(source, target)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"] = ["resnet20", "resnet56"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    smk = snakemake_commands(cwd=tmp_path)
    assert smk == dvc_commands(cwd=tmp_path)
    assert sum(" train " in f" {c} " for c in smk) == 2
    assert any("--model resnet56" in c for c in smk)


def test_configfile_reaches_every_job(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("train: {epochs: 1}\n")
    commands = snakemake_commands("--configfile", str(preset))
    assert commands
    assert all(f"--params params.yaml --params {preset}" in c for c in commands)


def test_config_overrides_are_validated_and_forwarded():
    """`snakemake --config seed=3` reaches every job as `--set`; bad values stop it at start-up."""
    commands = snakemake_commands("--config", "seed=3", "models=[resnet56]")
    assert all("--set seed=3 --set 'models=[\"resnet56\"]'" in c for c in commands)
    assert any("--model resnet56" in c for c in commands)
    bad = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--cores", "1", "--config", "seed=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "error: seed: -1 is not in [0, inf)" in bad.stdout + bad.stderr


@pytest.mark.parametrize("tool", ["snakemake", "dvc"])
def test_every_command_is_a_valid_cli_invocation(tool):
    """Each command parses: `--help` appended must succeed (catches renamed options)."""
    commands = snakemake_commands() if tool == "snakemake" else dvc_commands()
    for command in commands:
        words = command.split()
        help_run = subprocess.run(
            [str(BIN / "shrinkflow"), words[1], "--help"], capture_output=True, text=True
        )
        assert help_run.returncode == 0, help_run.stderr
        for option in [w for w in words if w.startswith("--")]:
            assert option in help_run.stdout, f"{option} not an option of `{words[1]}`"
