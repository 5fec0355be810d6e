"""shrinkflow.tracking against real MLflow on real SQLite files, with many processes at once."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from projects import BIN, make_project, tool_env

from shrinkflow.errors import ShrinkflowError
from shrinkflow.tracking import (
    flatten,
    job_run,
    prepare_store,
    read_run_ref,
    tracking_uri,
    write_run_ref,
)
from shrinkflow.tracking import health as tracking_health
from shrinkflow.tracking import sqlite as tracking_sqlite
from shrinkflow.tracking import store as tracking_store

WORKER = Path(__file__).with_name("tracking_worker.py")


def make_cfg(tmp_path: Path, experiment: str = "test") -> dict:
    return {
        "seed": 0,
        "data": {"name": "digits", "image_size": 32, "mirror": None},
        "backends": ["torch"],
        "tracking": {"experiment": experiment, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }


@pytest.fixture
def cfg(tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return make_cfg(tmp_path)


def client_for(cfg: dict) -> MlflowClient:
    return MlflowClient(cfg["tracking"]["uri"])


def steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_run_round_trips_params_metrics_tags_artifacts(
    cfg: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    monkeypatch.chdir(repo)
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    folder = tmp_path / "savedmodel"
    (folder / "variables").mkdir(parents=True)
    (folder / "variables" / "v.bin").write_bytes(b"v")

    with job_run(cfg, "train") as parent:
        pass
    with job_run(
        cfg,
        "prune",
        tags={"shrinkflow.backend": "torch", "shrinkflow.model": "resnet20"},
        source_run_id=parent.run_id,
        run_name="prune-l1",
    ) as job:
        for step in range(5):
            job.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 10}, step=step)
        job.log_metrics({"top1": 0.97})
        job.log_params({"prune": {"method": "l1", "sparsity": 0.5}})
        job.set_tags({"shrinkflow.sparsity": "0.5"})
        job.log_artifact(model)
        job.log_artifact(folder, artifact_path="export")

    client = client_for(cfg)
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "prune-l1"
    assert run.info.experiment_id == job.experiment_id
    assert client.get_experiment(job.experiment_id).name == "test-jobs"
    params = run.data.params
    assert params["data.image_size"] == "32"
    assert params["data.mirror"] == "null"
    assert params["backends"] == '["torch"]'
    assert params["tracking.experiment"] == "test"
    assert params["prune.method"] == "l1" and params["prune.sparsity"] == "0.5"
    tags = run.data.tags
    assert tags["shrinkflow.stage"] == "prune"
    assert tags["shrinkflow.backend"] == "torch" and tags["shrinkflow.model"] == "resnet20"
    assert tags["shrinkflow.sparsity"] == "0.5"
    # Lineage is a tag and a link in the description, never a parent that folds runs away.
    assert tags["shrinkflow.source_run_id"] == parent.run_id
    link = f"#/experiments/{job.experiment_id}/runs/{parent.run_id}?workflowType=machine_learning"
    assert tags["mlflow.note.content"] == f"Input written by run [train]({link})."
    assert "mlflow.parentRunId" not in tags
    assert tags["mlflow.source.git.commit"] == head.strip()
    assert steps(client, job.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert steps(client, job.run_id, "acc") == [(s, s / 10) for s in range(5)]
    assert steps(client, job.run_id, "top1") == [(0, 0.97)]
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    assert client.get_run(parent.run_id).info.run_name == "train"  # the stage, never random
    assert "shrinkflow.source_run_id" not in client.get_run(parent.run_id).data.tags

    assert {a.path for a in client.list_artifacts(job.run_id)} == {"model.bin", "export"}
    nested = client.list_artifacts(job.run_id, "export/savedmodel/variables")
    assert [a.path for a in nested] == ["export/savedmodel/variables/v.bin"]
    # Artifacts live beside the database, not in the cwd.
    stored = tmp_path / "mlartifacts" / job.run_id / "artifacts"
    assert (stored / "model.bin").read_bytes() == b"weights"
    assert not (repo / "mlruns").exists() and not (repo / "mlartifacts").exists()


def test_no_git_commit_tag_outside_a_repository(
    cfg: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    with job_run(cfg, "download") as job:
        pass
    assert "mlflow.source.git.commit" not in client_for(cfg).get_run(job.run_id).data.tags


def test_exception_marks_run_failed_and_propagates(cfg: dict) -> None:
    with pytest.raises(RuntimeError, match="boom"), job_run(cfg, "train") as job:
        job.log_metrics({"loss": 2.0}, step=0)
        raise RuntimeError("boom")
    run = client_for(cfg).get_run(job.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["loss"] == 2.0


def test_keyboard_interrupt_marks_run_killed(cfg: dict) -> None:
    with pytest.raises(KeyboardInterrupt), job_run(cfg, "train") as job:
        raise KeyboardInterrupt
    assert client_for(cfg).get_run(job.run_id).info.status == "KILLED"


def test_sigterm_marks_run_killed(cfg: dict, tmp_path: Path) -> None:
    uri = cfg["tracking"]["uri"]
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), uri, "0", "sleep", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[0] if proc.poll() is not None else "timed out"
    time.sleep(0.1)  # the id is written before the write_text returns; let the process settle
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output
    assert MlflowClient(uri).get_run(ready.read_text()).info.status == "KILLED"


def test_continuing_a_run_appends_to_it(cfg: dict) -> None:
    with job_run(cfg, "train", tags={"shrinkflow.model": "resnet20"}) as first:
        first.log_metrics({"loss": 1.0}, step=0)
        first.log_metrics({"loss": 0.9}, step=1)
    with job_run(cfg, "train", run_id=first.run_id) as resumed:
        resumed.log_metrics({"loss": 0.8}, step=2)
    assert resumed.run_id == first.run_id
    client = client_for(cfg)
    assert len(client.search_runs([first.experiment_id])) == 1
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["shrinkflow.model"] == "resnet20"
    assert steps(client, first.run_id, "loss") == [(0, 1.0), (1, 0.9), (2, 0.8)]


def test_continuing_keeps_first_params_and_logs_new_ones(cfg: dict) -> None:
    with job_run(cfg, "train") as first:
        pass
    cfg["data"]["image_size"] = 64
    cfg["train"] = {"epochs": 3}
    with job_run(cfg, "train", run_id=first.run_id):
        pass
    params = client_for(cfg).get_run(first.run_id).data.params
    assert params["data.image_size"] == "32"
    assert params["train.epochs"] == "3"


def test_unknown_run_id_starts_a_new_run(cfg: dict) -> None:
    with job_run(cfg, "train", run_id="0123456789abcdef0123456789abcdef") as job:
        pass
    assert job.run_id != "0123456789abcdef0123456789abcdef"
    assert client_for(cfg).get_run(job.run_id).info.status == "FINISHED"


def test_deleted_experiment_is_an_error(cfg: dict) -> None:
    prepare_store(cfg)
    client = client_for(cfg)
    client.delete_experiment(client.get_experiment_by_name("test").experiment_id)
    with pytest.raises(ShrinkflowError, match="tracking.experiment: 'test' is deleted"):
        prepare_store(cfg)


def test_prepare_store_is_idempotent(cfg: dict, tmp_path: Path) -> None:
    prepare_store(cfg)
    prepare_store(cfg)
    experiments = client_for(cfg).search_experiments()
    assert sorted(e.name for e in experiments) == ["Default", "test", "test-jobs"]
    for name in ("test", "test-jobs"):
        created = client_for(cfg).get_experiment_by_name(name)
        assert created.artifact_location == (tmp_path / "mlartifacts").as_uri()
        # the MLflow UI opens a model-training experiment on its runs, not on GenAI traces
        assert created.tags["mlflow.experimentKind"] == "custom_model_development"
        assert created.tags["mlflow.note.content"]


def test_an_older_store_gets_the_experiment_kind_but_keeps_a_users_choice(cfg: dict) -> None:
    client = client_for(cfg)
    client.create_experiment("test")  # as an older shrinkflow made it: no tags
    client.create_experiment("test-jobs", tags={"mlflow.experimentKind": "finetuning"})
    prepare_store(cfg)
    assert client.get_experiment_by_name("test").tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    assert client.get_experiment_by_name("test-jobs").tags["mlflow.experimentKind"] == "finetuning"


def test_an_artefact_run_has_the_axes_as_params_and_the_config_beside_them(
    cfg: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    axes = {"backend": "torch", "target_sparsity": 0.5, "seed": 1}
    with job_run(cfg, "evaluate", run_name="torch/x l1 0.5 seed1", axes=axes) as first:
        pass
    client = client_for(cfg)
    run = client.get_run(first.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "test"
    assert run.data.params == {"backend": "torch", "target_sparsity": "0.5", "seed": "1"}
    config = json.loads(
        Path(client.download_artifacts(first.run_id, "config.json", str(cfg_dir(cfg)))).read_text()
    )
    assert config == cfg
    # a failed attempt is continued by its retry, unless the config changed: another job
    monkeypatch.setenv("SHRINKFLOW_INVOCATION_ID", "retried")
    with pytest.raises(RuntimeError), job_run(cfg, "evaluate", run_name="a", axes=axes) as failed:
        raise RuntimeError("measuring failed")
    changed = {**cfg, "evaluate": {"repeats": 5}}
    with job_run(changed, "evaluate", run_name="a", axes=axes) as other:
        pass
    with job_run(cfg, "evaluate", run_name="a", axes=axes) as retried:
        pass
    assert retried.run_id == failed.run_id != other.run_id


def cfg_dir(cfg: dict) -> Path:
    return Path(cfg["tracking"]["uri"].removeprefix("sqlite:///")).parent


def test_lock_conflicts_are_retried_and_other_errors_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            try:
                raise OSError("(sqlite3.OperationalError) database is locked")
            except OSError as exc:
                raise RuntimeError("log_batch failed") from exc
        return "ok"

    assert tracking_sqlite.retry(flaky) == "ok"
    assert len(calls) == 4

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("no such table: runs")

    calls.clear()
    with pytest.raises(RuntimeError, match="no such table"):
        tracking_sqlite.retry(broken)
    assert len(calls) == 1


def test_lock_conflicts_give_up_after_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))

    def locked() -> None:
        raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError, match="locked"):
        tracking_sqlite.retry(locked)
    assert tracking_sqlite.RETRY_BUDGET_S - 10 < clock[0] <= tracking_sqlite.RETRY_BUDGET_S


# Starts tracking_worker.py's workers (argv: WORKER URI COUNT STEPS GO_FILE) as forks of one
# process that imported the worker's modules (mlflow's SQL store, shrinkflow.tracking) and
# touched no store: separate processes, each with its own connections as jobs have, without
# paying ~2.5 s of CPU for those imports each. Worker INDEX writes its output to
# GO_FILE-INDEX.log; the launcher prints one "INDEX STATUS" line per worker that ended.
FORKED_WORKERS = """
import os, sys, traceback

path, uri, count, steps, go = sys.argv[1:]
sys.path.insert(0, os.path.dirname(path))
import tracking_worker as worker  # its imports, not its main()

children = {}
for index in range(int(count)):
    pid = os.fork()
    if pid:
        children[pid] = index
        continue
    log = os.open(f"{go}-{index}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.argv = [path, uri, str(index), steps, go]
    try:
        worker.main()
        status = 0
    except BaseException:  # sys.exit("worker: ...") included
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
while children:
    pid, status = os.wait()
    print(children.pop(pid), os.waitstatus_to_exitcode(status), flush=True)
"""


def test_concurrent_jobs_on_a_fresh_store_lose_nothing(tmp_path: Path) -> None:
    n_workers, n_steps = 8, 50
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    launcher = subprocess.Popen(
        [sys.executable, "-c", FORKED_WORKERS, str(WORKER), uri, str(n_workers), str(n_steps),
         str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    ready = [tmp_path / f"ready-{i}" for i in range(n_workers)]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[0]  # died before the start
        time.sleep(0.05)
    assert not (tmp_path / "store").exists()  # nobody has touched the store before the start
    go.touch()
    launched = launcher.communicate(timeout=240)[0]
    assert launcher.returncode == 0, launched
    ended = dict(line.split() for line in launched.splitlines())
    for i in range(n_workers):
        output = Path(f"{go}-{i}.log").read_text()
        assert ended.get(str(i)) == "0", f"worker {i}:\n{output}"

    client = MlflowClient(uri)
    assert client.get_experiment_by_name("concurrency") is not None  # created once, beside it
    experiment = client.get_experiment_by_name("concurrency-jobs")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == n_workers
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(int(r.data.tags["worker"]) for r in runs) == list(range(n_workers))
    for run in runs:
        i = int(run.data.tags["worker"])
        assert run.data.params["seed"] == str(i)
        for n, key in enumerate(("loss", "acc", "lr")):
            history = steps(client, run.info.run_id, key)
            assert history == [(s, i + s / 100 + n) for s in range(n_steps)], (i, key)
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"worker-{i}.txt"]
    assert (tmp_path / "store" / "mlartifacts").is_dir()


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = {"tracking": {"experiment": "x", "uri": None}}
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(cfg).startswith("sqlite:////")  # absolute: jobs may run elsewhere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking_uri(cfg) == "http://tracker:5000"
    cfg["tracking"]["uri"] = "sqlite:////data/mlflow.db"
    assert tracking_uri(cfg) == "sqlite:////data/mlflow.db"


def test_run_ref_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "baseline"
    assert read_run_ref(folder) is None
    folder.mkdir(parents=True)
    assert read_run_ref(folder) is None
    write_run_ref(folder, "abc123", "train")
    assert read_run_ref(folder) == "abc123"
    assert '"stage": "train"' in (folder / "run.json").read_text()


def test_corrupt_run_ref_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ShrinkflowError, match="run.json"):
        read_run_ref(tmp_path)


def test_flatten() -> None:
    nested = {"a": 1, "b": {"c": [1, 2], "d": {"e": None}}, "f": {}}
    assert flatten(nested) == {"a": 1, "b.c": [1, 2], "b.d.e": None}
    assert flatten({"x": 1}, prefix="p.") == {"p.x": 1}


def test_module_import_does_not_import_mlflow() -> None:
    code = "import sys, shrinkflow.tracking; print('mlflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_a_retried_job_continues_its_failed_attempt_in_the_same_invocation(
    cfg: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snakemake's --retries: one run per job, however many attempts it took."""
    node = {"shrinkflow.backend": "torch", "shrinkflow.node": "baseline"}
    monkeypatch.setenv("SHRINKFLOW_INVOCATION_ID", "invocation-a")
    with pytest.raises(RuntimeError), job_run(cfg, "evaluate", tags=node, run_name="ev") as first:
        first.log_metrics({"top1": 0.5})
        raise RuntimeError("the tracking server went away")
    # another node of the same stage (a superset of the tags) is another job
    quantized = {**node, "shrinkflow.qmethod": "fixed_w4"}
    with job_run(cfg, "evaluate", tags=quantized, run_name="ev q") as other:
        pass
    with job_run(cfg, "evaluate", tags=node, run_name="ev") as retry:
        retry.log_metrics({"top1": 0.75})
    assert retry.run_id == first.run_id != other.run_id
    client = client_for(cfg)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["top1"] == 0.75
    monkeypatch.setenv("SHRINKFLOW_INVOCATION_ID", "invocation-b")
    with pytest.raises(RuntimeError), job_run(cfg, "evaluate", tags=node, run_name="ev") as b:
        raise RuntimeError("fails again, in the next invocation")
    assert b.run_id != first.run_id  # a finished run is never reopened by another invocation
    cfg["data"]["image_size"] = 64  # re-run by hand after a change: MLflow params are final
    with job_run(cfg, "evaluate", tags=node, run_name="ev") as changed:
        pass
    assert changed.run_id != b.run_id
    assert client.get_run(changed.run_id).data.params["data.image_size"] == "64"
    assert len(client.search_runs([first.experiment_id])) == 4


def test_http_retry_defaults_ride_out_minutes_and_yield_to_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )
    from urllib3.util.retry import Retry

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "3")  # the user's choice wins
    tracking_store.import_mlflow()
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 3
    retries = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
    assert retries == 8
    # urllib3's own backoff with our factor: the waits MLflow's client sleeps between attempts
    retry, waits = Retry(total=retries, backoff_factor=1, backoff_jitter=0), []
    for _ in range(retries):
        retry = retry.increment(method="POST", url="/", error=ConnectionRefusedError())
        waits.append(retry.get_backoff_time())
    assert waits[:4] == [0, 2, 4, 8]  # a short restart is noticed within seconds
    assert 200 < sum(waits) < 300  # and an outage of ~4 minutes is ridden out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def server_cfg(uri: str) -> dict:
    return {"tracking": {"experiment": "x", "uri": uri}}


def test_an_unreachable_server_is_one_line_after_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    monkeypatch.setenv(tracking_health.SERVER_WAIT_ENV, "2")
    started = time.monotonic()
    with pytest.raises(ShrinkflowError) as raised:
        tracking_health.require_server(server_cfg(f"http://user:secret@127.0.0.1:{port}/"))
    assert 2 <= time.monotonic() - started < 8
    assert str(raised.value) == (
        f"MLflow tracking server http://127.0.0.1:{port} is unreachable (connection refused for "
        "2 s); start it with `make mlflow-server` or set tracking.uri (or MLFLOW_TRACKING_URI)"
    )  # and never shows the password
    with pytest.raises(ShrinkflowError, match="unknown host 'nowhere.invalid'"):
        tracking_health.require_server(server_cfg("http://nowhere.invalid:5000"), wait_s=0)


def test_only_http_stores_need_a_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracking_health.SERVER_WAIT_ENV, "soon")
    # no check at all
    tracking_health.require_server(server_cfg(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    with pytest.raises(ShrinkflowError, match="^SHRINKFLOW_TRACKING_WAIT_S: 'soon' is not a"):
        tracking_health.require_server(server_cfg(f"http://127.0.0.1:{closed_port()}"))


def test_a_cli_job_refuses_an_unreachable_server_before_writing(tmp_path: Path) -> None:
    """`dvc repro` runs the CLI directly: the job itself fails early, with one line."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}"}
    env[tracking_health.SERVER_WAIT_ENV] = "1"
    out = tmp_path / "results/models/torch/resnet20/seed0/baseline/model"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "shrinkflow"), "train", "--backend", "torch",
         "--model", "resnet20", "--params", str(root / "params.yaml"),
         "--in", "data/prepared/digits", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: MLflow tracking server http://127.0.0.1:")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []  # no results folder, no resume folder, no store


def test_snakemake_refuses_an_unreachable_server_before_any_job(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    before = sorted(p.name for p in project.iterdir())
    port = closed_port()
    env = tool_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    # A dry run needs no server. It runs while the run below waits for the server, in a copy of
    # the project of its own: the run must leave its project as it was.
    dry = subprocess.Popen(
        [str(BIN / "snakemake"), "-n", "--cores", "2"],
        cwd=make_project(tmp_path / "dry-run"), env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    # tracking_health.START_WAIT_S, then Snakemake's own start
    assert time.monotonic() - started < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: MLflow tracking server http://127.0.0.1:{port} is unreachable (connection "
        "refused for 5 s); start it with `make mlflow-server` or set tracking.uri (or "
        "MLFLOW_TRACKING_URI)"
    ], result.stderr[-2000:]
    assert "localrule" not in result.stderr + result.stdout  # no job started
    after = sorted(p.name for p in project.iterdir() if p.name != ".snakemake")
    assert after == before  # no data, no results, no store
    dry_stderr = dry.communicate(timeout=300)[1]
    assert dry.returncode == 0, dry_stderr[-2000:]
