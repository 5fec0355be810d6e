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
    """The job's exit status from a warm server, or None: run it here (no server answered;
    one is started for the jobs that follow). A job handed back with variables to set is sent
    to the server of that environment, or run here with them."""
    env = dict(os.environ)
    for _attempt in range(2):
        try:
            paths = identity.server_paths(env)
        except OSError:
            return None  # no private runtime folder: run here
        conn = _connect(paths.socket)
        if conn is None:
            _start_server(paths, env)
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
                return _die_like(int(message["signal"]), previous)
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


def _die_like(signum: int, previous: Mapping) -> int:
    """End as the child ended: killed by ``signum`` (the shell's 128 + N if that fails)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum


def _start_server(paths: identity.ServerPaths, env: Mapping[str, str]) -> None:
    """Start the server of this identity in the background, unless one holds its lock (it is
    starting or running) or its imports failed before."""
    if paths.failed.exists():
        return
    with open(paths.lock, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        fcntl.flock(lock, fcntl.LOCK_UN)
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
