"""The `shrinkflow` command: a stage command goes to a warm server when one serves this
installation, otherwise (and for every other command) it runs here (``shrinkflow.cli``).

Imports only the standard library and shrinkflow's small ``warm`` modules before it decides.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

from shrinkflow import warm
from shrinkflow.warm import identity, protocol

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main() -> None:
    argv = sys.argv[1:]
    if _wants_warm(argv, os.environ):
        status = run_warm(argv)
        if status is not None:
            sys.exit(status)
    from shrinkflow.cli import main as run_here

    run_here()


def _wants_warm(argv: list[str], environ: Mapping[str, str]) -> bool:
    """A stage's sub-command (a DAG job); the others (validate, models, dvc-yaml...) are quick
    and import no framework, so they never wait for a server."""
    from shrinkflow.stage_table import STAGES

    command = next((arg for arg in argv if not arg.startswith("-")), None)
    asks_help = any(arg in ("--help", "-h", "--version") for arg in argv)
    stage_commands = {stage.sub_command for stage in STAGES}
    return command in stage_commands and not asks_help and warm.enabled(environ)


def run_warm(argv: list[str]) -> int | None:
    """The job's exit status from a warm server, or None: run it here (no server came). With
    no server of this identity yet, one is started and the job waits for it (its imports take
    as long as the job's own would). A job handed back with variables to set is sent to the
    server of that environment, or run here with them."""
    env = dict(os.environ)
    for _attempt in range(2):
        try:
            paths = identity.server_paths(env)
        except OSError:
            return None  # no private runtime folder: run here
        conn = _connect(paths.socket) or _started_server(paths, env)
        if conn is None:
            os.environ.update(env)
            return None
        with conn:
            outcome = _run_on(conn, argv, env)
        if isinstance(outcome, dict):  # handed back: these variables must hold at import
            env.update(outcome)
            continue
        return outcome
    os.environ.update(env)
    return None


def _connect(path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:  # no server, or a dead one's socket file
        sock.close()
        return None
    return sock


def _run_on(conn: socket.socket, argv: list[str], env: dict[str, str]) -> int | dict | None:
    """Send the job; its exit status (128 + N, or death by the same signal, if a signal N
    killed it), or the variables it was handed back for."""
    job = protocol.Job(argv=argv, cwd=os.getcwd(), env=env, path=list(sys.path))
    child: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in FORWARDED}

    def forward(signum, _frame) -> None:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child[0], signum)  # the job and what it started

    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        protocol.send_job(conn, job, [0, 1, 2])
        restart = None
        for message in protocol.messages(conn):
            if "pid" in message:
                child.append(int(message["pid"]))
            elif "restart" in message:
                restart = dict(message["restart"])
            elif "exit" in message:
                return restart if restart is not None else int(message["exit"])
            elif "signal" in message:
                return _die_like(int(message["signal"]))
    except OSError:
        if not child:
            return None  # the server went away before it took the job: run it here
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # The server stopped mid-job: its child's outcome is unknown.
    print(
        "error: the warm shrinkflow server stopped during this job: run it again", file=sys.stderr
    )
    return 1


def _die_like(signum: int) -> int:
    """End as the child ended: killed by ``signum`` (the shell's 128 + N if that fails)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum


# How long a job waits for a server that is starting (importing both frameworks and MLflow:
# 10-20 s on 2 cores) before it runs itself: as long as its own imports would take, without
# importing them a second time beside the server.
START_WAIT_S = 60.0
# A server just started takes its lock within this; a lock still free after it means none is
# coming (its imports failed, or it lost the race to another, which then holds the lock).
LOCK_GRACE_S = 5.0


def _started_server(paths: identity.ServerPaths, env: Mapping[str, str]) -> socket.socket | None:
    """A connection to the server of this identity once it is ready: started here unless one
    is starting already (it holds its lock); None if none comes (its imports failed before, or
    fail now, or it is not ready within START_WAIT_S): the job then runs here."""
    if paths.failed.exists():
        return None
    started = time.monotonic()
    _start_server(paths, env)
    while time.monotonic() - started < START_WAIT_S:
        time.sleep(0.1)
        conn = _connect(paths.socket)
        if conn is not None:
            return conn
        if paths.failed.exists():
            return None
        if time.monotonic() - started > LOCK_GRACE_S and not _lock_held(paths.lock):
            return None
    return None


def _lock_held(path) -> bool:
    """Whether a server (starting or running) holds the lock file at ``path``."""
    try:
        with open(path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    return False


def _start_server(paths: identity.ServerPaths, env: Mapping[str, str]) -> None:
    """Start the server of this identity in the background, unless one holds its lock (it is
    starting or running)."""
    if _lock_held(paths.lock):
        return
    server_env = {k: v for k, v in env.items() if k not in identity.THREAD_ENV}
    with open(paths.log, "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "shrinkflow.warm.server", str(paths.socket)],
            env=server_env,
            cwd=paths.socket.parent,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
