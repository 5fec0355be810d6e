"""The shared tracking server (`make mlflow-server`: MLflow on PostgreSQL, artefacts served), for
real: its data survives a restart. (tests/test_report_mlflow_server.py runs a whole DAG against
it through a restart.)"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import READY, TrackingServer, clean_env, tags
from postgres_service import postgres_folder, postgres_missing
from projects import BIN, ROOT

pytestmark = pytest.mark.skipif(bool(postgres_missing()), reason=str(postgres_missing()))
EXPERIMENT = "shrinkflow-jobs"  # a download job's run: every job but evaluate logs there


@pytest.fixture
def server_folder() -> Iterator[Path]:
    folder = postgres_folder()  # the server's PostgreSQL runs as the postgres user under root
    yield folder / "srv"
    subprocess.run(["rm", "-rf", str(folder)], check=True)


def test_make_mlflow_server_keeps_its_data_across_restarts(server_folder: Path, tmp_path: Path):
    from mlflow import MlflowClient

    env = clean_env()
    tracking = TrackingServer(server_folder, env)
    tracking.start()
    try:
        assert tracking.server.health() == 200
        assert f"{READY}{tracking.server.uri}\n" in tracking.log.read_text()
        # a second server on the same port: refused at once, before PostgreSQL is touched
        started = time.monotonic()
        clash = subprocess.run(
            [sys.executable, "-m", "shrinkflow.tracking.server", "--folder",
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
