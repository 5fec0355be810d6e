"""Warm jobs (shrinkflow.warm): a stage command forked from a server that imported everything
once behaves as the same command in a fresh process: same outputs, same exit status and error
line, signals passed on, a killed command's job killed, a hand-back re-run where its
environment holds; the server's identity changes with the code and import-time variables."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from projects import BIN, tool_env
from stage_projects import make_stage_project

import shrinkflow
from shrinkflow import warm
from shrinkflow.warm import client, identity, protocol
from shrinkflow.warm.server import Loop

TRAIN = ["train", "--backend", "torch", "--model", "resnet20", "--seed", "0"]
DIGITS_8X8 = ["--set", "data.image_size=8"]


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has ended


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_stage_project(tmp_path_factory.mktemp("warm"))


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """A runtime folder of this module's own (XDG_RUNTIME_DIR), its server started and
    ready; the server is stopped afterwards."""
    if os.path.exists(warm.NVIDIA_DEVICE):
        pytest.skip("no warm server on a machine with an NVIDIA GPU (shrinkflow.warm)")
    folder = tmp_path_factory.mktemp("xdg")
    env = tool_env(XDG_RUNTIME_DIR=str(folder), SHRINKFLOW_WARM="1", SHRINKFLOW_WARM_IDLE="300")
    # The first command finds no server: it starts one and waits for it (a bad argument: the
    # job itself is quick).
    subprocess.run([BIN / "shrinkflow", "evaluate"], env=env, capture_output=True, check=False)
    logs = folder / "shrinkflow"
    _wait_for(lambda: list(logs.glob("*.sock")), 180, "the warm server's socket")
    yield env, logs
    for log in logs.glob("*.log"):
        for pid in re.findall(r"ready in .* pid (\d+)", log.read_text()):
            if _alive(int(pid)):
                os.kill(int(pid), signal.SIGTERM)


def _server_log(logs: Path) -> str:
    return "\n".join(log.read_text() for log in logs.glob("*.log"))


def _jobs_run(logs: Path) -> int:
    return len(re.findall(r"job \d+: ended", _server_log(logs)))


def test_a_warm_job_writes_what_a_fresh_process_writes(project, runtime, tmp_path):
    env, logs = runtime
    args = [*TRAIN, "--in", str(project / "prepared"), *DIGITS_8X8, "--set", "train.epochs=1"]
    before = _jobs_run(logs)
    for mode in ("0", "1"):
        subprocess.run(
            [BIN / "shrinkflow", *args, "--out", str(tmp_path / mode / "model")],
            cwd=project,
            env={**env, warm.ENV: mode, "OMP_NUM_THREADS": "1"},
            check=True,
            capture_output=True,
        )
    assert _jobs_run(logs) == before + 1  # the second ran warm, the first in its own process
    fresh, warmed = ((tmp_path / m / "model/model.pt").read_bytes() for m in ("0", "1"))
    assert fresh == warmed
    # The server imported torch without OMP_NUM_THREADS (all cores); the child computes with
    # its job's count, as a fresh process reading it at import would.
    subprocess.run(
        [BIN / "shrinkflow", "evaluate", "--in", str(tmp_path / "1/model"), *DIGITS_8X8]
        + ["--data", str(project / "prepared"), "--out", str(tmp_path / "metrics.json")]
        + ["--set", "evaluate.repeats=1", "--set", "evaluate.batch_sizes=[1]"],
        cwd=project,
        env={**env, "OMP_NUM_THREADS": "1"},
        check=True,
        capture_output=True,
    )
    assert _jobs_run(logs) == before + 2
    assert json.loads((tmp_path / "metrics.json").read_text())["threads"] == 1


def test_a_failing_warm_job_exits_with_its_status_and_one_line(project, runtime, tmp_path):
    env, logs = runtime
    before = _jobs_run(logs)
    result = subprocess.run(
        [BIN / "shrinkflow", "evaluate", "--in", str(tmp_path / "absent"), "--data", "x"]
        + ["--out", str(tmp_path / "m.json")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert _jobs_run(logs) == before + 1
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "absent" in result.stderr and len(result.stderr.splitlines()) == 1


def _long_warm_job(project: Path, env: dict, out: Path) -> tuple[subprocess.Popen, int]:
    """A warm training of 500 epochs (it never ends by itself here) and its child's pid."""
    logs = Path(env["XDG_RUNTIME_DIR"]) / "shrinkflow"
    seen = set(re.findall(r"job (\d+): train", _server_log(logs)))
    command = subprocess.Popen(
        [BIN / "shrinkflow", *TRAIN, "--in", str(project / "prepared"), *DIGITS_8X8]
        + ["--set", "train.epochs=500", "--out", str(out)],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def child() -> int | None:
        new = set(re.findall(r"job (\d+): train", _server_log(logs))) - seen
        return int(new.pop()) if new else None

    return command, _wait_for(child, 60, "the warm child")


def test_sigterm_to_the_command_reaches_its_job(project, runtime, tmp_path):
    env, _ = runtime
    command, pid = _long_warm_job(project, env, tmp_path / "model")
    time.sleep(1.0)  # into the job
    command.send_signal(signal.SIGTERM)
    status = command.wait(timeout=60)
    assert status != 0
    _wait_for(lambda: not _alive(pid), 30, "the job to end")


def test_a_command_killed_outright_takes_its_job_with_it(project, runtime, tmp_path):
    env, _ = runtime
    command, pid = _long_warm_job(project, env, tmp_path / "model")
    command.kill()  # SIGKILL: the command cannot pass it on; the server sees it gone
    command.wait(timeout=10)
    _wait_for(lambda: not _alive(pid), 30, "the job to be killed")


def test_a_handed_back_job_runs_where_its_variables_hold(tmp_path, monkeypatch):
    """The child asks for TF_ENABLE_ONEDNN_OPTS=0 at import: the command looks for the server
    of that environment (none here: it is started) and runs the job itself with it."""
    runtime = Path(tempfile.mkdtemp(prefix="sf-", dir="/tmp"))  # short: a socket's path
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    first = identity.server_paths(dict(os.environ))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(first.socket))
    listener.listen(1)
    received: list[protocol.Job] = []

    def fake_server() -> None:
        conn, _ = listener.accept()
        job, fds = protocol.receive_job(conn)
        received.append(job)
        for fd in fds:
            os.close(fd)
        protocol.send_message(conn, pid=os.getpid())
        protocol.send_message(conn, restart={"TF_ENABLE_ONEDNN_OPTS": "0"})
        protocol.send_message(conn, exit=0)
        conn.close()

    started: list[dict] = []
    monkeypatch.setattr(client, "_start_server", lambda paths, env: started.append(dict(env)))
    monkeypatch.setattr(client, "LOCK_GRACE_S", 0.2)  # no server takes the lock: none is coming
    thread = threading.Thread(target=fake_server)
    thread.start()
    assert client.run_warm(["finetune", "--in", "x"]) is None  # run it here
    thread.join(timeout=10)
    listener.close()
    shutil.rmtree(runtime)
    assert received[0].argv == ["finetune", "--in", "x"] and received[0].cwd == os.getcwd()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert started and started[0]["TF_ENABLE_ONEDNN_OPTS"] == "0"  # that server, for the next


def test_a_warm_child_hands_back_a_job_that_needs_other_imports(monkeypatch):
    from shrinkflow.backends.base import ONEDNN_ENV, use_safe_training_kernels

    monkeypatch.delenv(ONEDNN_ENV, raising=False)
    monkeypatch.setattr(warm, "IN_WARM_CHILD", True)
    use_safe_training_kernels({"backend": "tensorflow", "model": "resnet20"})  # oneDNN is fine
    with pytest.raises(warm.FreshImports) as handback:
        use_safe_training_kernels({"backend": "tensorflow", "model": "my_cnn"})
    assert handback.value.env == {ONEDNN_ENV: "0"}
    monkeypatch.setenv(ONEDNN_ENV, "1")  # the user's setting: kept, nothing to hand back
    use_safe_training_kernels({"backend": "tensorflow", "model": "my_cnn"})


def test_the_identity_follows_the_code_and_import_time_variables(tmp_path, monkeypatch):
    package = tmp_path / "shrinkflow"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(shrinkflow, "__file__", str(package / "__init__.py"))
    base = {"PATH": "/bin"}
    key = identity.digest(base, path=[])
    assert identity.digest({**base, "OMP_NUM_THREADS": "1", "HOME": "/x"}, path=[]) == key
    assert identity.digest({**base, "TF_ENABLE_ONEDNN_OPTS": "0"}, path=[]) != key
    assert identity.digest({**base, "PYTHONPATH": "/src"}, path=[]) != key
    (package / "stage.py").write_text("x = 1\n")
    assert identity.digest(base, path=[]) != key


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, True),
        ({warm.ENV: "0"}, False),
        ({warm.ENV: "off"}, False),
        ({"SLURM_JOB_ID": "7"}, False),
    ],
)
def test_when_jobs_go_warm(environ, expected, monkeypatch):
    monkeypatch.setattr(warm, "NVIDIA_DEVICE", "/nonexistent")
    assert warm.enabled(environ) is expected
    assert client._wants_warm(["evaluate", "--in", "x"], environ) is expected
    assert not client._wants_warm(["validate"], environ)
    assert not client._wants_warm(["train", "--help"], environ)
    monkeypatch.setattr(warm, "NVIDIA_DEVICE", "/dev/null")  # a GPU machine: CUDA and fork
    assert not warm.enabled(environ)


def test_an_idle_server_exits_and_one_whose_socket_is_gone_too(tmp_path):
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    said: list[str] = []
    started = time.monotonic()
    Loop(listener, path, idle_s=0.2, say=said.append).run()
    assert said == ["idle: exiting"] and time.monotonic() - started < 6
    loop = Loop(listener, path, idle_s=60, say=said.append)
    path.unlink()
    loop.run()
    assert said[-1] == "socket file gone or replaced: exiting"
    listener.close()
