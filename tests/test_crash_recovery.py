"""After a crash, the README's recovery (plain `snakemake`) resumes: stale locks, incomplete jobs,
MLflow runs; and a failed job's reason reaches the terminal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shrinkflow import recovery

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    environment = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    environment.pop("MLFLOW_TRACKING_URI", None)
    environment.pop("SHRINKFLOW_INVOCATION_ID", None)
    return environment


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

TINY = {
    "backends": ["torch"],
    "data": {"image_size": 8},
    "train": {"epochs": 2, "batch_size": 128, "warmup_epochs": 0},
    "prune": {"methods": [], "sparsities": []},
    "sensitivity": {"ratios": []},
    "quantize": {"methods": []},
    # slow enough to be killed while measuring
    "evaluate": {"batch_sizes": [1, 32], "warmup": 2, "repeats": 30},
}


def tiny_project(dest: Path) -> Path:
    """A copy of the project whose whole DAG is download, prepare, train, sensitivity (off),
    evaluate, summarize and report of one torch model."""
    for name in ["Snakefile", "workflow", "profiles", "src", ".dvcignore"]:
        source = ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(source, dest / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy(source, dest / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in TINY.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def running_evaluate(db: Path) -> bool:
    query = (
        "SELECT count(*) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
        "JOIN params ON params.run_uuid = runs.run_uuid WHERE runs.status = 'RUNNING' "
        "AND tags.key = 'shrinkflow.stage' AND tags.value = 'evaluate' AND params.key = 'seed'"
    )
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(query).fetchone()[0] > 0
    except sqlite3.Error:
        return False


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's "Job stats" table: how many jobs of each rule this run had to do."""
    table = output.split("Job stats:")[1].split("total")[0]
    rows = (line.split() for line in table.splitlines())
    return {words[0]: int(words[1]) for words in rows if len(words) == 2 and words[1].isdigit()}


@pytest.mark.slow
def test_snakemake_killed_mid_run_resumes_with_the_readme_command(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    project = tiny_project(tmp_path)
    db = project / "mlflow.db"
    first = subprocess.Popen(
        [str(BIN / "snakemake"), "--cores", "2"],
        cwd=project,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: kill it and its jobs at once
    )
    deadline = time.monotonic() + 300
    while not running_evaluate(db) and first.poll() is None and time.monotonic() < deadline:
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
        env=env(),
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
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("shrinkflow")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    stages = sorted(r.data.tags["shrinkflow.stage"] for r in runs)
    statuses = {r.info.status for r in runs}
    assert statuses == {"FINISHED"}, [(r.data.tags, r.info.status) for r in runs]
    assert stages == sorted(
        ["download", "prepare", "train", "sensitivity", "evaluate", "summarize", "report"]
    )
    assert (project / "results/report/index.html").is_file()
    assert not list(project.rglob(f"*{'.mlflow-run'}"))
