"""The shared tracking server (`make mlflow-server`: MLflow on PostgreSQL, artefacts served), for
real: its data survives a restart, and a whole DAG run with `--cores 4` rides out a restart of the
server in the middle of training, losing no run, metric or artefact and duplicating none."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from mlflow_server import Server, free_port, tags
from postgres_service import postgres_folder, postgres_missing, postgres_service
from test_pipeline_e2e import BIN, ROOT, make_project

pytestmark = pytest.mark.skipif(bool(postgres_missing()), reason=str(postgres_missing()))
EXPERIMENT = "shrinkflow"
READY = "export MLFLOW_TRACKING_URI="
START_TIMEOUT_S = 180  # the first start migrates an empty database: ~20 s on two idle cores
OUTAGE_S = 5  # how long the server stays down, on top of its stop and start (~10 s together)
EPOCHS = 5  # the server stops after the first: the others (~1 s each) end while it is down


def clean_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI", "SHRINKFLOW_INVOCATION_ID"):
        env.pop(name, None)
    return {**env, **extra}


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)
    return result


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrackingServer:
    """`python -m shrinkflow.tracking_server` (what `make mlflow-server` runs) in its own session;
    stopped as Ctrl-C stops it. Its output accumulates in ``log`` over restarts."""

    def __init__(self, folder: Path, port: int, env: dict[str, str]) -> None:
        self.folder, self.port, self.env = folder, port, env
        self.log = folder.with_suffix(".log")
        self.server = Server(f"http://127.0.0.1:{port}")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        starts = self.log.read_text().count(READY) if self.log.exists() else 0
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shrinkflow.tracking_server", "--folder", str(self.folder),
                 "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                # As a script's `make mlflow-server &` or nohup leaves it: SIGINT ignored.
                # Ctrl-C (stop()) must stop it all the same.
                preexec_fn=ignore_sigint,
            )  # fmt: skip

        def ready() -> bool:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            return self.log.read_text().count(READY) > starts

        wait_for(ready, START_TIMEOUT_S, "the tracking server")

    def stop(self) -> int:
        """Ctrl-C: a terminal signals the foreground process group, here the module alone (its
        MLflow server and PostgreSQL run in sessions of their own)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return process.returncode if process else 0
        os.killpg(process.pid, signal.SIGINT)
        try:
            return process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise


@pytest.fixture
def server_folder() -> Iterator[Path]:
    folder = postgres_folder()  # the module's PostgreSQL runs as the postgres user under root
    yield folder / "srv"
    subprocess.run(["rm", "-rf", str(folder)], check=True)


def health(server: Server) -> int:
    with urllib.request.urlopen(f"{server.uri}/health", timeout=10) as response:
        return response.status


def runs_so_far(tracking: TrackingServer) -> list[dict]:
    """The experiment's runs; none before the first job creates the experiment."""
    try:
        return tracking.server.runs(EXPERIMENT)
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
        return []


def test_make_mlflow_server_keeps_its_data_across_restarts(server_folder: Path, tmp_path: Path):
    from mlflow import MlflowClient

    env = clean_env()
    tracking = TrackingServer(server_folder, free_port(), env)
    tracking.start()
    try:
        assert health(tracking.server) == 200
        assert f"{READY}{tracking.server.uri}\n" in tracking.log.read_text()
        # a second server on the same port: refused at once, before PostgreSQL is touched
        started = time.monotonic()
        clash = subprocess.run(
            [sys.executable, "-m", "shrinkflow.tracking_server", "--folder",
             str(server_folder), "--port", str(tracking.port)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert clash.returncode == 2 and time.monotonic() - started < 15
        assert clash.stderr.startswith(f"error: --port {tracking.port}: "), clash.stderr
        assert "in use" in clash.stderr and len(clash.stderr.splitlines()) == 1

        client = MlflowClient(tracking.server.uri)
        run = client.create_run(client.create_experiment("kept"))
        run_id = run.info.run_id
        client.log_metric(run_id, "loss", 0.25, step=3)
        (tmp_path / "note.txt").write_text("served artefact\n")
        client.log_artifact(run_id, str(tmp_path / "note.txt"))
        client.set_terminated(run_id)
        assert tracking.stop() == 0
        assert not (server_folder / "postgres/data/postmaster.pid").exists()  # shut down cleanly
        assert "stopping the MLflow server and PostgreSQL" in tracking.log.read_text()

        # A job started while the server is down waits for it (SHRINKFLOW_TRACKING_WAIT_S).
        job = subprocess.Popen(
            [str(BIN / "shrinkflow"), "download", "--params", str(ROOT / "params.yaml"),
             "--out", "data/raw/digits"],
            cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": tracking.server.uri},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        tracking.start()  # the same cluster again, on another free PostgreSQL port
        output = job.communicate(timeout=120)[0]
        assert job.returncode == 0, output
        assert (tmp_path / "data/raw/digits").is_dir()

        again = client.get_run(run_id)
        assert again.info.status == "FINISHED"
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.25)]
        assert [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
        fetched = Path(client.download_artifacts(run_id, "note.txt", str(tmp_path / "fetched")))
        assert fetched.read_text() == "served artefact\n"
        runs = tracking.server.runs(EXPERIMENT)
        assert [(tags(r)["shrinkflow.stage"], r["info"]["status"]) for r in runs] == [
            ("download", "FINISHED")
        ]
    finally:
        tracking.stop()


def job_stats(output: str) -> Counter:
    """Snakemake's `Job stats` table: jobs per rule (without `all` and the total)."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    rows = re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.MULTILINE)
    return Counter({rule: int(n) for rule, n in rows if rule not in ("all", "job")})


def same_files(local: Path, served: Path) -> bool:
    """Every file of the folder ``local`` is in ``served`` with the same bytes (but for the
    timestamp Snakemake adds to a directory output after its job ends)."""
    files = sorted(
        p.relative_to(local)
        for p in local.rglob("*")
        if p.is_file() and p.name != ".snakemake_timestamp"
    )
    return bool(files) and all(
        (served / f).is_file() and (served / f).read_bytes() == (local / f).read_bytes()
        for f in files
    )


@pytest.mark.slow
def test_a_dag_rides_out_a_tracking_server_restart(server_folder: Path, tmp_path: Path):
    """The server (on an external PostgreSQL, MLFLOW_BACKEND_STORE_URI) stops as soon as the
    training job has logged its first epoch and comes back OUTAGE_S later on the same port; the
    later epochs are logged meanwhile. Every job must finish in one run each, with its per-epoch
    metrics and its artefacts."""
    (tmp_path / "project").mkdir()
    project = make_project(tmp_path / "project", quantize_methods=[])  # time: 10 jobs, not 14
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prune"]["methods"] = ["l1_unstructured"]
    params["sensitivity"]["ratios"] = [0.5]
    params["train"]["epochs"] = EPOCHS
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with postgres_service() as store:
        tracking = TrackingServer(
            server_folder, free_port(), clean_env(MLFLOW_BACKEND_STORE_URI=store)
        )
        tracking.start()
        log = tmp_path / "snakemake.log"
        with log.open("w") as out:
            dag = subprocess.Popen(
                [str(BIN / "snakemake"), "--cores", "4"],
                cwd=project, env=clean_env(MLFLOW_TRACKING_URI=tracking.server.uri),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:

            def training() -> bool:
                assert dag.poll() is None, log.read_text()[-3000:]
                return any(
                    tags(r)["shrinkflow.stage"] == "train"
                    and any(m["key"] == "val_top1" for m in r["data"].get("metrics", []))
                    for r in runs_so_far(tracking)
                )

            wait_for(training, 300, "the first epoch's metrics")
            down = time.time() * 1000
            assert tracking.stop() == 0
            time.sleep(OUTAGE_S)
            tracking.start()
            up = time.time() * 1000
            assert dag.wait(timeout=600) == 0, log.read_text()[-5000:]
            runs = tracking.server.runs(EXPERIMENT)
            train = next(r for r in runs if tags(r)["shrinkflow.stage"] == "train")
            history = tracking.server.get(
                "metrics/get-history", run_id=train["info"]["run_id"], metric_key="val_top1"
            )["metrics"]
        finally:
            if dag.poll() is None:
                os.killpg(dag.pid, signal.SIGTERM)
                dag.wait()
            tracking.stop()
    output = log.read_text()
    assert "Error in rule" not in output, output[-5000:]

    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    stages = Counter(tags(r)["shrinkflow.stage"] for r in runs)
    expected = Counter()
    for rule, n in job_stats(output).items():
        expected[rule.removesuffix("_quantized")] += n  # evaluate_quantized runs `evaluate`
    assert stages == expected  # every job logged exactly one run
    named = [r["info"]["run_name"] for r in runs if tags(r)["shrinkflow.stage"] not in
             ("download", "prepare")]  # fmt: skip
    assert len(named) == len(set(named)), "a job logged two runs"

    by_id = {r["info"]["run_id"]: r for r in runs}
    with (project / "results/summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["run_id"] for row in rows} <= by_id.keys()
    for row in rows:
        logged = {m["key"]: m["value"] for m in by_id[row["run_id"]]["data"]["metrics"]}
        assert logged["top1"] == pytest.approx(float(row["top1"]))

    assert sorted(m["step"] for m in history) == list(range(1, EPOCHS + 1))  # one per epoch
    assert any(down < m["timestamp"] < up for m in history), "no epoch ended during the outage"

    artifacts = server_folder / "artifacts"
    model_runs = 0
    for ref in (project / "results/models").rglob("model/run.json"):
        run = by_id[yaml.safe_load(ref.read_text())["run_id"]]
        served = artifacts / run["info"]["experiment_id"] / run["info"]["run_id"] / "artifacts"
        assert same_files(ref.parent, served / "model"), f"{ref.parent} did not arrive whole"
        model_runs += 1
    assert model_runs == sum(stages[s] for s in ("train", "prune", "finetune")) == 3
