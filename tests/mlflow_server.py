"""The tracking server for tests: `python -m shrinkflow.tracking.server` (what `make
mlflow-server` runs) on a free 127.0.0.1 port, started, stopped as Ctrl-C stops it and started
again; talk to it through MLflow's REST API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from projects import tool_env

from shrinkflow.tracking.server import free_port

__all__ = ["READY", "Server", "TrackingServer", "clean_env", "free_port", "tags", "wait_for"]
READY = "export MLFLOW_TRACKING_URI="  # the line the server prints once it serves
START_TIMEOUT_S = 180  # the first start migrates an empty database: ~20 s on two idle cores


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

    def health(self) -> int:
        with urllib.request.urlopen(f"{self.uri}/health", timeout=10) as response:
            return response.status

    def runs(self, *experiments: str) -> list[dict]:
        """Every run of ``experiments``, following the pages."""
        experiment_ids = [
            self.get("experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]
            for name in experiments
        ]
        runs, token = [], None
        while True:
            body = {"experiment_ids": experiment_ids, "max_results": 500}
            if token:
                body["page_token"] = token
            page = self.post("runs/search", body)
            runs.extend(page.get("runs", []))
            token = page.get("next_page_token")
            if not token:
                return runs

    def runs_so_far(self, *experiments: str) -> list[dict]:
        """The runs of those of ``experiments`` that exist (a job creates them)."""
        runs = []
        for name in experiments:
            try:
                runs.extend(self.runs(name))
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
        return runs


def clean_env(**extra: str) -> dict[str, str]:
    """:func:`projects.tool_env` without a backend store inherited from a caller either, and
    ``extra``."""
    env = tool_env(MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_BACKEND_STORE_URI", None)
    return {**env, **extra}


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``condition`` every half second until it is true; its value."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)
    return result


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrackingServer:
    """`python -m shrinkflow.tracking.server --folder FOLDER --port PORT` in its own session,
    with ``env`` (MLFLOW_BACKEND_STORE_URI there names an external store; without it the server
    keeps its own PostgreSQL cluster in FOLDER). Its output accumulates in ``log`` over
    restarts."""

    def __init__(self, folder: Path, env: dict[str, str], port: int | None = None) -> None:
        self.folder, self.env, self.port = folder, env, port or free_port()
        self.log = folder.with_suffix(".log")
        self.server = Server(f"http://127.0.0.1:{self.port}")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it; return once it printed its READY line (again)."""
        starts = self.log.read_text().count(READY) if self.log.exists() else 0
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shrinkflow.tracking.server", "--folder", str(self.folder),
                 "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                # As a script's `make mlflow-server &` or nohup leaves it: SIGINT ignored.
                # Ctrl-C (stop()) must stop it all the same.
                preexec_fn=_ignore_sigint,
            )  # fmt: skip

        def ready() -> bool:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            return self.log.read_text().count(READY) > starts

        wait_for(ready, START_TIMEOUT_S, "the tracking server")

    def stop(self) -> int:
        """Ctrl-C: a terminal signals the foreground process group, here the module alone (its
        MLflow server and PostgreSQL run in sessions of their own). Its exit status."""
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
