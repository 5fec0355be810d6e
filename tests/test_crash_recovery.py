"""After a crash, the README's recovery (plain `snakemake`) resumes: stale locks, incomplete jobs,
MLflow runs; and a failed job's reason reaches the terminal."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from projects import BIN, job_counts, mlflow_runs, tool_env
from stage_projects import make_tiny_dag_project, running_runs, stopping_cli

from shrinkflow import recovery

# ---- release_stale_locks: never breaks a lock a live run may hold ----


def lock(workdir: Path) -> Path:
    locks = workdir / recovery.LOCKS
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text(f"{workdir}/results/x\n")
    return locks


def record(workdir: Path, host: str, pid: int) -> Path:
    path = workdir / recovery.OWNERS / f"{host}-{pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "start": 0.0}))
    return path


def test_no_lock_no_note(tmp_path: Path) -> None:
    assert recovery.release_stale_locks(tmp_path) is None


def test_a_lock_whose_run_died_on_this_host_is_removed(tmp_path: Path) -> None:
    locks = lock(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = record(tmp_path, socket.gethostname(), int(dead.stdout))
    note = recovery.release_stale_locks(tmp_path)
    assert note is not None and "removed" in note
    assert not locks.exists() and not stale.exists()


def test_a_lock_is_kept_while_a_snakemake_runs_in_the_folder(tmp_path: Path) -> None:
    fake = tmp_path / "bin/snakemake"  # a process whose command line says snakemake
    fake.parent.mkdir()
    fake.write_text("import time\ntime.sleep(60)\n")
    locks = lock(tmp_path)
    live = subprocess.Popen([sys.executable, str(fake)], cwd=tmp_path)
    try:
        time.sleep(0.2)
        note = recovery.release_stale_locks(tmp_path)
        assert note is not None and f"pid {live.pid}" in note and locks.exists()
    finally:
        live.kill()
        live.wait()
    assert "removed" in recovery.release_stale_locks(tmp_path) and not locks.exists()


def test_a_lock_of_a_run_on_another_host_is_left_to_the_user(tmp_path: Path) -> None:
    locks = lock(tmp_path)
    elsewhere = record(tmp_path, "login2.example", 4242)
    note = recovery.release_stale_locks(tmp_path)
    assert note is not None and "login2.example" in note and "snakemake --unlock" in note
    assert locks.exists()
    recovery.register_run(tmp_path, ["snakemake", "--unlock"])  # the user vouches for it
    assert not elsewhere.exists()


def test_failed_job_errors_quote_the_logs_error_line(tmp_path: Path) -> None:
    log = tmp_path / "download.log"
    log.write_text("some progress\nerror: data.root: nowhere is not a folder\n")
    traceback = tmp_path / "train.log"
    traceback.write_text("Traceback (most recent call last):\n  ...\nValueError: boom\n\n")

    class Rule:
        def __init__(self, name: str) -> None:
            self.name = name

    class Job:
        def __init__(self, rule: str, log: Path) -> None:
            self.rule, self.log = Rule(rule), [str(log)]

    assert recovery.failed_job_errors([Job("download", log), Job("train", traceback)]) == [
        f"error: rule download failed ({log}): data.root: nowhere is not a folder",
        f"error: rule train failed ({traceback}): ValueError: boom",
    ]


# ---- the real thing: kill -9 a tiny `snakemake` run, then the README's recovery ----


@pytest.mark.slow
def test_snakemake_killed_mid_run_resumes_with_the_readme_command(tmp_path: Path) -> None:
    """`snakemake` and its jobs killed outright (SIGKILL to the process group) while the evaluate
    job runs, after download, prepare and train finished: plain `snakemake` (the README's
    recovery, through profiles/default) removes the stale lock, re-runs only the unfinished jobs
    and leaves every MLflow run FINISHED (the killed evaluate's run continued, not orphaned)."""
    project = make_tiny_dag_project(tmp_path / "project")
    # The first run's evaluate job hangs once its MLflow run is open: the kill lands mid-job.
    hanging = stopping_cli(tmp_path / "bin", hang_in="evaluate")
    env = tool_env()
    first = subprocess.Popen(
        [str(BIN / "snakemake"), "--cores", "2"],
        cwd=project,
        env={**env, "PATH": f"{hanging}:{env['PATH']}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: kill it and its jobs at once
    )
    deadline = time.monotonic() + 300
    while (
        not running_runs(project / "mlflow.db", "evaluate")
        and first.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    before = first.communicate()[0]
    assert "Using workflow specific profile profiles/default" in before
    assert any((project / recovery.LOCKS).glob("*.lock"))  # what used to need --unlock

    # README: "run `snakemake --cores 2` again"
    again = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2"],
        cwd=project,
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert "removed .snakemake/locks" in output
    # resumed: the finished jobs are not run again
    counts = job_counts(output)
    assert counts["evaluate"] == 1, output[-4000:]  # killed: re-run
    assert not {"download", "prepare", "train"} & set(counts), counts  # finished: kept
    runs = mlflow_runs(project)
    stages = sorted(r.data.tags["shrinkflow.stage"] for r in runs)
    statuses = {r.info.status for r in runs}
    assert statuses == {"FINISHED"}, [(r.data.tags, r.info.status) for r in runs]
    assert stages == sorted(
        ["download", "prepare", "train", "sensitivity", "evaluate", "summarize", "report"]
    )
    assert (project / "results/report/index.html").is_file()
    assert not list(project.rglob(f"*{'.mlflow-run'}"))
