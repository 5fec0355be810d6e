"""A real `mlflow server` on 127.0.0.1 for tests: its own port, SQLite store and served
artefacts, stopped when the test ends. Talk to it through its REST API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shrinkflow.tracking_server import free_port

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120  # a cold start imports MLflow and migrates a fresh store: ~10 s idle


@dataclass(frozen=True)
class Server:
    uri: str  # http://127.0.0.1:<port>

    def get(self, endpoint: str, **query: object) -> dict:
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.uri}/api/2.0/mlflow/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def runs(self, experiment: str) -> list[dict]:
        """Every run of ``experiment``, following the pages."""
        experiment_id = self.get("experiments/get-by-name", experiment_name=experiment)[
            "experiment"
        ]["experiment_id"]
        runs, token = [], None
        while True:
            body = {"experiment_ids": [experiment_id], "max_results": 500}
            if token:
                body["page_token"] = token
            page = self.post("runs/search", body)
            runs.extend(page.get("runs", []))
            token = page.get("next_page_token")
            if not token:
                return runs


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@contextmanager
def mlflow_server(folder: Path) -> Iterator[Server]:
    """Start `mlflow server` with its store and artefacts in ``folder``; stop it afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"), "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", str(folder / "artifacts"),
        ],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        start_new_session=True,  # its uvicorn workers are stopped with it
    )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{server.uri}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield server
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        log.close()
