"""Helpers for the tests that run single `shrinkflow` stages, or kill a job and resume it:
small projects made in-process (no `shrinkflow` process, no MLflow run), and a `shrinkflow`
that stops itself at a chosen point, so a kill lands where a test needs it, never by a race."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from projects import ROOT, make_project, tool_env

DIGITS_8X8 = ("data.image_size=8",)  # the data projects.TINY and the stage projects train on


def prepare_digits(dest: Path, overrides: tuple[str, ...] = DIGITS_8X8) -> Path:
    """Download and prepare the digits in-process, as `shrinkflow download` and `shrinkflow
    prepare` with ROOT's params.yaml and ``overrides`` would, into ``dest`` (no MLflow run, so
    there is no run.json: a stage reading it has no parent run). Returns ``dest``."""
    from shrinkflow.config import load_params
    from shrinkflow.data.download import download
    from shrinkflow.data.prepare import prepare

    cfg = load_params([ROOT / "params.yaml"], list(overrides))
    raw = dest.parent / f"{dest.name}-raw"
    download(cfg, raw)
    prepare(cfg, raw, dest)
    shutil.rmtree(raw)
    return dest


def make_stage_project(dest: Path) -> Path:
    """params.yaml, prepared 8x8 digits (``prepared/``, and ``raw/``: the download) and an
    untrained resnet20 baseline (``results/models/torch/resnet20/seed0/baseline/model``), made
    in-process without MLflow runs."""
    import torch

    from shrinkflow.backends.torch.artifact import save_model
    from shrinkflow.backends.torch.models import create_model
    from shrinkflow.config import load_params
    from shrinkflow.data.download import download
    from shrinkflow.data.prepare import prepare
    from shrinkflow.data.prepared import load_prepared
    from shrinkflow.outputs import write_json
    from shrinkflow.stages import NODE_FILE
    from shrinkflow.training import model_spec

    shutil.copy(ROOT / "params.yaml", dest / "params.yaml")
    cfg = load_params([dest / "params.yaml"], list(DIGITS_8X8))
    download(cfg, dest / "raw")
    prepare(cfg, dest / "raw", dest / "prepared")
    data = load_prepared(dest / "prepared")
    torch.manual_seed(0)
    spec = model_spec("resnet20", data)
    model = create_model("resnet20", len(data.classes), spec["in_channels"], spec["image_size"])
    folder = dest / "results/models/torch/resnet20/seed0/baseline/model"
    folder.mkdir(parents=True)
    save_model(model, spec, folder)
    node = {"backend": "torch", "model": "resnet20", "stage": "baseline", "seed": 0}
    write_json(folder / NODE_FILE, node)
    return dest


def make_tiny_dag_project(dest: Path, **sections: dict) -> Path:
    """projects.make_project with nothing to prune or quantize: the whole DAG is download,
    prepare, train, sensitivity (no ratios), evaluate, summarize and report of one torch model
    (seven jobs); ``sections`` are updated over that last."""
    return make_project(
        dest,
        **{
            "prune": {"methods": [], "sparsities": []},
            "sensitivity": {"ratios": []},
            "quantize": {"methods": []},
            **sections,
        },
    )


def running_runs(db: Path, stage: str | None = None) -> int:
    """RUNNING runs (of ``stage``, if given) that have logged their params, read with plain
    sqlite3 so that polling never creates the store (0 until its schema exists)."""
    if not db.is_file():
        return 0
    query = (
        "SELECT count(*) FROM runs JOIN params ON params.run_uuid = runs.run_uuid "
        "WHERE runs.status = 'RUNNING' AND params.key = 'seed'"
    )
    if stage is not None:
        query += (
            " AND EXISTS (SELECT 1 FROM tags WHERE tags.run_uuid = runs.run_uuid"
            " AND tags.key = 'shrinkflow.stage' AND tags.value = ?)"
        )
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(query, () if stage is None else (stage,)).fetchone()[0]
    except sqlite3.Error:
        return 0


# ---- a `shrinkflow` that stops itself at a known point ----

_STOPPING_CLI = '''#!{python}
"""`shrinkflow`, stopped at a known point (written by tests/stage_projects.py).

Otherwise the real CLI: the stop is a wrapper around os.replace (the last step of every atomic
write in shrinkflow.outputs) or around JobRun.log_params (the last step of opening a job's run).
"""
import os
import signal
import sys
import time
from pathlib import Path

from shrinkflow import tracking
from shrinkflow.cli import main

KILL_AFTER = {kill_after!r}  # (file name, n): SIGKILL this process once it wrote it n times
HANG_IN = {hang_in!r}  # a sub-command that hangs once its MLflow run is open


def replace(src, dst, *args, _real=os.replace, _written=[0], **kwargs):
    _real(src, dst, *args, **kwargs)
    if KILL_AFTER and Path(dst).name == KILL_AFTER[0]:
        _written[0] += 1
        if _written[0] == KILL_AFTER[1]:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs: as `kill -9` from outside


def log_params(self, params, _real=tracking.JobRun.log_params):
    _real(self, params)
    if sys.argv[1:2] == [HANG_IN]:
        while True:  # until the test kills it
            time.sleep(60)


os.replace = replace
tracking.JobRun.log_params = log_params
sys.exit(main())
'''


def stopping_cli(
    bin_dir: Path, *, kill_after: tuple[str, int] | None = None, hang_in: str | None = None
) -> Path:
    """Write a `shrinkflow` into ``bin_dir`` (put it first on PATH) that runs the real CLI but
    SIGKILLs itself right after its ``kill_after[1]``-th atomic write of a file named
    ``kill_after[0]`` (a resume state: killed between two epochs, deterministically), or, in
    sub-command ``hang_in``, hangs as soon as its MLflow run is open and has its params (to be
    killed there by the test: it cannot end first). Returns ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    cli = bin_dir / "shrinkflow"
    cli.write_text(
        _STOPPING_CLI.format(python=sys.executable, kill_after=kill_after, hang_in=hang_in)
    )
    cli.chmod(0o755)
    return bin_dir


def run_killed(project: Path, args: list[str], bin_dir: Path, kill_after: tuple[str, int]) -> None:
    """`shrinkflow *args` in ``project``, through a :func:`stopping_cli` written to ``bin_dir``
    that SIGKILLs itself after ``kill_after``; asserts that it died of that signal."""
    killing = stopping_cli(bin_dir, kill_after=kill_after) / "shrinkflow"
    killed = subprocess.run(
        [str(killing), *args], cwd=project, env=tool_env(), capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
