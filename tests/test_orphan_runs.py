"""A job killed outright (SIGKILL: no cleanup runs) never leaves an MLflow run RUNNING forever.

The re-run is another invocation (a new `snakemake` or `dvc repro`), so only the scratch file
beside the job's output (tracking.run_marker) ties the two attempts together: the re-run continues
the killed attempt's run when the params are the same, and closes it as KILLED when they changed.
"""

from __future__ import annotations

import ast
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from projects import BIN, ROOT, store_runs, tool_env
from stage_projects import make_stage_project, running_runs, stopping_cli

from shrinkflow import tracking
from shrinkflow.outputs import read_json, write_json
from shrinkflow.tracking import job_run, run_marker

STAGES = ROOT / "src/shrinkflow/stages"
EVALUATE = ["--set", "data.image_size=8", "--set", 'evaluate={"device": "cpu", '
            '"batch_sizes": [1, 64], "warmup": 1, "repeats": 3}']  # fmt: skip


def runs_of(db: Path, stage: str) -> list:
    found = store_runs(f"sqlite:///{db}")
    return [r for r in found if r.data.tags.get(tracking.STAGE_TAG) == stage]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_stage_project(tmp_path)


def evaluate(project: Path, invocation: str, cli: Path = BIN) -> subprocess.Popen:
    """`shrinkflow evaluate` of the baseline as its own invocation (a new snakemake/dvc run), with
    the `shrinkflow` in ``cli``."""
    cmd = [str(cli / "shrinkflow"), "evaluate", *EVALUATE,
           "--in", "results/models/torch/resnet20/seed0/baseline/model", "--data", "prepared",
           "--out", "results/models/torch/resnet20/seed0/baseline/metrics.json"]  # fmt: skip
    env = tool_env(SHRINKFLOW_INVOCATION_ID=invocation)
    return subprocess.Popen(cmd, cwd=project, env=env, stderr=subprocess.PIPE, text=True)


def kill_once_running(job: subprocess.Popen, db: Path) -> None:
    """SIGKILL ``job`` as soon as its MLflow run is open with its params."""
    deadline = time.monotonic() + 120
    while running_runs(db) == 0 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.02)
    assert job.poll() is None, f"evaluate ended before it could be killed: {job.stderr.read()}"
    job.send_signal(signal.SIGKILL)
    job.wait()


def test_a_killed_evaluate_job_is_continued_by_the_next_invocation(project: Path) -> None:
    db = project / "mlflow.db"
    metrics = project / "results/models/torch/resnet20/seed0/baseline/metrics.json"
    # the first attempt hangs once its run is open (it cannot end before the kill)
    hanging = stopping_cli(project / "bin", hang_in="evaluate")
    kill_once_running(evaluate(project, "first", cli=hanging), db)
    (killed,) = runs_of(db, "evaluate")
    assert killed.info.status == "RUNNING" and not metrics.exists()
    assert run_marker(metrics).is_file()

    again = evaluate(project, "second")
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    (run,) = runs_of(db, "evaluate")  # one run for the job, not a RUNNING orphan beside it
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["shrinkflow.invocation"] == "second"
    assert "top1" in run.data.metrics
    assert not run_marker(metrics).exists()  # the scratch file goes once the run has ended
    # the artefact's row: in the experiment a user compares, named by what it is, axes as params
    assert run.info.run_name == "torch/resnet20 baseline seed0"
    experiment = MlflowClient(f"sqlite:///{db}").get_experiment(run.info.experiment_id)
    assert experiment.name == "shrinkflow"
    assert run.data.params["prune_method"] == "none" and run.data.params["seed"] == "0"


# ---- in-process: the marker's life cycle, on a store copied from a migrated template ----


@pytest.fixture
def cfg(tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return {
        "seed": 0,
        "data": {"name": "digits"},
        "tracking": {"experiment": "test", "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }


def test_marker_lives_while_the_run_is_open_and_goes_when_it_ends(
    cfg: dict, tmp_path: Path
) -> None:
    out = tmp_path / "node/metrics.json"
    with job_run(cfg, "evaluate", out=out) as job:
        assert read_json(run_marker(out)) == {"run_id": job.run_id}
    assert not run_marker(out).exists()
    with pytest.raises(RuntimeError), job_run(cfg, "evaluate", out=out):
        raise RuntimeError("bad input")
    assert not run_marker(out).exists()  # FAILED is a result: a re-run opens a new run
    with pytest.raises(KeyboardInterrupt), job_run(cfg, "evaluate", out=out) as interrupted:
        raise KeyboardInterrupt
    assert run_marker(out).is_file()  # KILLED: the next attempt continues it
    with job_run(cfg, "evaluate", out=out) as resumed:
        pass
    assert resumed.run_id == interrupted.run_id
    client = MlflowClient(cfg["tracking"]["uri"])
    assert client.get_run(resumed.run_id).info.status == "FINISHED"


@pytest.fixture
def abandon(cfg: dict):
    """Open a job's run and never end it, as a SIGKILL leaves it: RUNNING, its marker written.
    (The context is kept referenced until teardown: collecting it would end the run.)"""
    opened = []

    def open_run(stage: str, out: Path) -> str:
        previous = signal.getsignal(signal.SIGTERM)
        context = job_run(cfg, stage, out=out)
        opened.append(context)
        run_id = context.__enter__().run_id
        signal.signal(signal.SIGTERM, previous)  # job_run's handler, never uninstalled
        return run_id

    yield open_run
    opened.clear()


def test_a_killed_job_rerun_with_other_params_closes_the_old_run_as_killed(
    cfg: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abandon
) -> None:
    out = tmp_path / "node/metrics.json"
    killed = abandon("evaluate", out)
    monkeypatch.setenv("SHRINKFLOW_INVOCATION_ID", "next")
    cfg["seed"] = 1  # MLflow params are final: this is a new run
    with job_run(cfg, "evaluate", out=out) as rerun:
        pass
    client = MlflowClient(cfg["tracking"]["uri"])
    assert rerun.run_id != killed
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(rerun.run_id).info.status == "FINISHED"
    assert not run_marker(out).exists()


def test_a_resumed_job_keeps_its_run_and_closes_a_different_marked_one(
    cfg: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training's resume state names its run: that one continues; another run the marker names
    (a later attempt killed before it saved an epoch) is closed, never left RUNNING."""
    out = tmp_path / "baseline/model"
    client = MlflowClient(cfg["tracking"]["uri"])
    with job_run(cfg, "train", out=out) as saved:
        pass
    orphan = client.create_run(saved.experiment_id, tags={tracking.STAGE_TAG: "train"}).info.run_id
    write_json(run_marker(out), {"run_id": orphan})
    monkeypatch.setenv("SHRINKFLOW_INVOCATION_ID", "later")
    with job_run(cfg, "train", out=out, run_id=saved.run_id) as resumed:
        pass
    assert resumed.run_id == saved.run_id
    assert client.get_run(orphan).info.status == "KILLED"


def test_a_marker_naming_a_finished_or_unknown_run_is_ignored(cfg: dict, tmp_path: Path) -> None:
    out = tmp_path / "summary.csv"
    with job_run(cfg, "summarize", out=out) as first:
        pass
    for stale in (first.run_id, "0" * 32, None):
        write_json(run_marker(out), {"run_id": stale})
        with job_run(cfg, "summarize", out=out) as again:
            pass
        assert again.run_id != first.run_id
    client = MlflowClient(cfg["tracking"]["uri"])
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_every_stage_names_its_output_to_its_run() -> None:
    """Each stage's run gets its output: without it a killed attempt's run is orphaned. A stage
    opens its run with ``tracking.job_run(..., out=...)``, or through
    ``model_job(cfg, stage, node, out, ...)``, which passes ``out`` on to ``job_run``."""
    opened: dict[str, list[ast.Call]] = {}
    for module in sorted(STAGES.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                if name in ("job_run", "model_job"):
                    opened.setdefault(module.name, []).append(node)
    stages = {m.name for m in STAGES.glob("*.py")} - {"__init__.py", "model_job.py"}
    assert sorted(opened.keys() - {"model_job.py"}) == sorted(stages)  # each opens one run
    for module, calls in opened.items():
        for call in calls:
            named = {k.arg for k in call.keywords}
            given = "out" in named or (call.func.id == "model_job" and len(call.args) >= 4)
            assert given, f"{module}:{call.lineno} opens a run without its output"


def test_dvc_ignores_the_marker(tmp_path: Path) -> None:
    """Beside a model it sits inside results/models, the summarize stage's dependency: DVC must
    leave it out of that hash (and never push it)."""
    shutil.copy(ROOT / ".dvcignore", tmp_path / ".dvcignore")
    dvc = str(BIN / "dvc")
    env = tool_env(DVC_NO_ANALYTICS="1")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    marker = run_marker(Path("results/models/torch/resnet20/seed0/baseline/metrics.json"))
    result = subprocess.run(
        [
            dvc,
            "check-ignore",
            str(marker),
            "results/models/torch/resnet20/seed0/baseline/metrics.json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.stdout.split() == [str(marker)], result.stderr
