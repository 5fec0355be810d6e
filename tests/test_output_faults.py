"""Where outputs cannot be written, or memory runs out, a stage says so in one line on the route
`dvc repro` takes (the CLI), before it computes anything when it can tell, and never as a
traceback; under Snakemake the reason reaches the terminal, not only the job's log."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from projects import BIN, tool_env
from stage_projects import make_stage_project, make_tiny_dag_project

from shrinkflow.cli import environment_failure
from shrinkflow.outputs import check_writable

MODEL = "results/models/torch/resnet20/seed0/baseline/model"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stage_project(tmp_path_factory.mktemp("faults"))


@pytest.fixture
def mount(tmp_path: Path):
    """Mount a 64 KiB tmpfs (read-only if asked) at a fresh folder; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def make(name: str, *options: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        opts = ",".join(["size=64k", *options])
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)],
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def shrinkflow(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "shrinkflow"), *args, "--set", "data.image_size=8"],
                          cwd=project, env=tool_env(), capture_output=True, text=True)  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def runs(db: Path) -> int:
    if not db.is_file():
        return 0
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0]


def test_a_read_only_output_folder_fails_in_one_line_before_any_work(project: Path, mount) -> None:
    readonly = mount("ro", "ro")
    before = runs(project / "mlflow.db")
    evaluate = shrinkflow(project, "evaluate", "--in", MODEL, "--data", "prepared",
                          "--out", f"{readonly}/metrics.json")  # fmt: skip
    line = one_error_line(evaluate)
    assert line == (
        f"error: cannot write {readonly}: the file system is read-only: write the outputs to "
        "a writable location or remount it read-write"
    )
    train = shrinkflow(project, "train", "--backend", "torch", "--model", "resnet20",
                       "--in", "prepared", "--out", f"{readonly}/baseline/model")  # fmt: skip
    assert "read-only" in one_error_line(train)
    assert runs(project / "mlflow.db") == before  # refused before a run was opened


def test_a_full_disk_is_one_line_naming_where(project: Path, mount) -> None:
    full = mount("full")
    result = shrinkflow(project, "prepare", "--in", "raw", "--out", f"{full}/prepared")
    line = one_error_line(result)
    assert line.startswith(f"error: cannot write {full}/prepared: the disk is full")
    assert f"the file system holding {full}" in line and "free space and re-run" in line
    assert not list(full.rglob(".tmp-*")) and not (full / "prepared").exists()


def test_torchs_failed_zip_write_reads_as_a_full_disk(tmp_path: Path) -> None:
    import torch

    with pytest.raises(RuntimeError) as raised:  # /dev/full: every write fails with ENOSPC
        torch.save({"w": torch.zeros(10_000)}, "/dev/full")
    out = tmp_path / "baseline/model"
    argv = ["train", "--backend", "torch", "--in", "p", "--out", str(out)]
    assert environment_failure(raised.value, argv).startswith(
        f"cannot write {out}: the disk is full (the file system holding {tmp_path}"
    )
    with pytest.raises(OSError) as plain, open("/dev/full", "w") as handle:
        handle.write("x")
        handle.flush()
    assert "the disk is full" in environment_failure(plain.value, argv)


def test_out_of_memory_names_the_batch_size_key() -> None:
    import torch

    with pytest.raises(RuntimeError) as raised:
        torch.empty(2**50)  # torch's CPU allocator refuses at once, nothing is allocated
    assert environment_failure(raised.value, ["train", "--out", "m"]) == (
        "out of memory in `shrinkflow train`: lower train.batch_size (--set train.batch_size=...)"
    )
    assert environment_failure(MemoryError(), ["evaluate", "--out", "m.json"]) == (
        "out of memory in `shrinkflow evaluate`: lower evaluate.batch_sizes "
        "(--set evaluate.batch_sizes=...)"
    )
    assert environment_failure(ValueError("a bug"), ["train"]) is None  # bugs keep tracebacks


def test_the_cli_says_out_of_memory_in_one_line(project: Path) -> None:
    code = (
        "import sys\n"
        "from shrinkflow import cli\n"
        "import shrinkflow.stages.finetune as stage\n"
        "def run(*args):\n"
        "    raise MemoryError()\n"
        "stage.run = run\n"
        "sys.argv = ['shrinkflow', 'finetune', '--in', 'm', '--data', 'd', '--out', 'o']\n"
        "cli.main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True,
                            text=True)  # fmt: skip
    assert one_error_line(result) == (
        "error: out of memory in `shrinkflow finetune`: lower train.batch_size "
        "(--set train.batch_size=...)"
    )


def test_check_writable_names_the_folder_and_leaves_nothing(tmp_path: Path, mount) -> None:
    check_writable(tmp_path / "new/deeper/metrics.json")  # creates the folder it will need
    assert (tmp_path / "new/deeper").is_dir() and not list((tmp_path / "new").rglob("*.json"))
    readonly = mount("ro", "ro")
    with pytest.raises(OSError) as raised:
        check_writable(readonly / "sub/metrics.json")
    assert raised.value.errno == errno.EROFS and raised.value.filename == str(readonly / "sub")


# ---- under a real `snakemake` (without the default profile's show-failed-logs) ----


@pytest.mark.parametrize(
    ("root", "reason"),
    [
        ("nowhere", "data.root: nowhere is not a folder"),
        ("images", "data.root: class 'a' (images/a) holds no images"),
    ],
)
def test_snakemake_prints_a_failed_jobs_reason(tmp_path: Path, root: str, reason: str) -> None:
    project = make_tiny_dag_project(tmp_path)
    (project / "images/a").mkdir(parents=True)
    config = f'data={{"name": "imagefolder", "root": "{root}"}}'
    cmd = [str(BIN / "snakemake"), "--cores", "1", "--workflow-profile", "none",
           "--config", config]  # fmt: skip
    result = subprocess.run(cmd, cwd=project, env=tool_env(), capture_output=True, text=True)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert reason in output, output[-3000:]
