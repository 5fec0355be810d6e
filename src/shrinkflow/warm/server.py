"""The warm server: imports what jobs import once, then forks one child per job.

    python -m shrinkflow.warm.server SOCKET     (started by the `shrinkflow` command)

Single-threaded: one ``selectors`` loop over the listening socket, each job's connection (its
command closing it means the command was killed: the child is stopped) and each child's pidfd
(its exit is reported to the command). It exits after ``SHRINKFLOW_WARM_IDLE`` seconds without
a job, or when its socket file is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import importlib
import os
import selectors
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

from shrinkflow import warm
from shrinkflow.stage_table import STAGES
from shrinkflow.warm import identity, protocol

# Imported once, in this order (torch before TensorFlow: triton's bundled LLVM crashes the
# other way round): the CLI and every stage module, then each backend's job modules, which
# import their framework, Torch-Pruning, torchao, tfmot... A framework that fails to import is
# left out (its jobs import it themselves and report why).
CORE_MODULES = (
    "shrinkflow.cli",
    "shrinkflow.custom_models",  # imported by every params check (config.py)
    "jsonschema",  # the params schema's validator (config.py)
    "shrinkflow.tracking.store",
    "shrinkflow.tracking.registry",
    *dict.fromkeys(f"shrinkflow.stages.{stage.module}" for stage in STAGES),
)


def preload() -> list[str]:
    """Import what jobs import; the backends that could not be imported, with why."""
    from shrinkflow.backends.base import BACKENDS, JOB_MODULES
    from shrinkflow.tracking import store

    for name in CORE_MODULES:
        importlib.import_module(name)
    store.preload()
    missing = []
    for backend in BACKENDS:  # torch first
        try:
            for job in JOB_MODULES:
                importlib.import_module(f"shrinkflow.backends.{backend}.{job}")
        except Exception as exc:  # its jobs import it themselves and say why
            missing.append(f"{backend}: {type(exc).__name__}: {exc}")
    return missing


def serve(socket_path: Path, idle_s: float) -> None:
    paths = identity.ServerPaths.of(socket_path)
    lock = open(paths.lock, "a")  # noqa: SIM115 - held (flock) for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    started = time.monotonic()
    try:
        for backend in preload():
            say(f"not preloaded: {backend}")
    except BaseException:
        paths.failed.write_text(traceback.format_exc())
        raise
    gc.collect()
    gc.freeze()  # children share the imported objects' pages instead of copying them
    say(f"ready in {time.monotonic() - started:.1f} s, pid {os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        paths.socket.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(paths.socket))
    listener.listen(64)
    loop = Loop(listener, paths.socket, idle_s, say)
    try:
        loop.run()
    finally:
        if loop.socket_is_mine():
            paths.socket.unlink()
        paths.lock.unlink(missing_ok=True)
        listener.close()
        _forget_old_logs(paths.log.parent)


def _forget_old_logs(folder: Path, days: float = 7.0) -> None:
    """Remove the logs (and failure notes) of servers gone for ``days``: each edit of the code
    starts a server of a new identity, with a log of its own."""
    cutoff = time.time() - days * 86400
    for path in [*folder.glob("*.log"), *folder.glob("*.failed")]:
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


class Loop:
    """Accept jobs, fork children, report their ends."""

    def __init__(self, listener: socket.socket, path: Path, idle_s: float, say) -> None:
        self.listener = listener
        self.path = path
        self.inode = os.stat(path).st_ino
        self.idle_s = idle_s
        self.say = say
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, ("accept", None))
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pid -> (conn, pidfd)
        self.last_activity = time.monotonic()

    def run(self) -> None:
        while True:
            events = self.selector.select(timeout=min(self.idle_s, 1.0))
            for key, _mask in events:
                kind, data = key.data
                if kind == "accept":
                    self.accept()
                elif kind == "child":
                    self.reap(data)
                elif kind == "conn":
                    self.command_gone(data)
            if not self.children:
                if time.monotonic() - self.last_activity > self.idle_s:
                    self.say("idle: exiting")
                    return
                if not self.socket_is_mine():
                    self.say("socket file gone or replaced: exiting")
                    return

    def socket_is_mine(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10.0)
        try:
            job, fds = protocol.receive_job(conn)
        except (OSError, ValueError) as exc:
            self.say(f"bad request: {exc}")
            conn.close()
            return
        conn.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 70  # EX_SOFTWARE, if the child's set-up itself fails
            try:
                self._close_for_child(conn)
                status = run_child(job, fds, conn)
            finally:
                os._exit(status)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):  # also in the child: whichever runs first
            os.setpgid(pid, pid)
        pidfd = os.pidfd_open(pid)
        self.children[pid] = (conn, pidfd)
        self.selector.register(pidfd, selectors.EVENT_READ, ("child", pid))
        self.selector.register(conn, selectors.EVENT_READ, ("conn", pid))
        self.last_activity = time.monotonic()
        with contextlib.suppress(OSError):
            protocol.send_message(conn, pid=pid)
        self.say(f"job {pid}: {' '.join(job.argv[:1])} in {job.cwd}")

    def _close_for_child(self, own: socket.socket) -> None:
        """In the child: drop the server's descriptors but the job's own connection."""
        for conn, pidfd in self.children.values():
            conn.close()
            os.close(pidfd)
        self.selector.close()
        self.listener.close()
        del own  # kept open: a hand-back is sent on it

    def reap(self, pid: int) -> None:
        conn, pidfd = self.children.pop(pid)
        self.selector.unregister(pidfd)
        with contextlib.suppress(KeyError):  # not if its command is gone (command_gone)
            self.selector.unregister(conn)
        os.close(pidfd)
        _, status, usage = os.wait4(pid, 0)
        with contextlib.suppress(OSError):
            if os.WIFSIGNALED(status):
                protocol.send_message(conn, signal=os.WTERMSIG(status))
            else:
                protocol.send_message(conn, exit=os.waitstatus_to_exitcode(status))
        conn.close()
        self.last_activity = time.monotonic()
        self.say(
            f"job {pid}: ended ({os.waitstatus_to_exitcode(status)}), "
            f"cpu {usage.ru_utime + usage.ru_stime:.1f} s, max rss {usage.ru_maxrss // 1024} MiB"
        )

    def command_gone(self, pid: int) -> None:
        """The job's command closed its connection before the job ended. It passes SIGINT,
        SIGTERM and SIGHUP on and waits, so it was killed outright (SIGKILL): the child and
        what it started end the same way, with no clean-up, as a fresh job's process would
        have. Its end is reaped as usual."""
        conn, _ = self.children[pid]
        with contextlib.suppress(OSError):
            if conn.recv(1, socket.MSG_PEEK):
                return  # the command sends nothing after the request; ignore stray bytes
        self.selector.unregister(conn)
        self.say(f"job {pid}: its command is gone, killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def run_child(job: protocol.Job, fds: list[int], conn: socket.socket) -> int:
    """Become the job's process and run the CLI; the exit status."""
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.setpgid(0, 0)
    os.chdir(job.cwd)
    os.environ.clear()
    os.environ.update(job.env)
    sys.argv = ["shrinkflow", *job.argv]
    sys.path[:] = job.path
    tempfile.tempdir = None  # TMPDIR as the job has it (Snakemake's tmpdir resource)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=stream.isatty())
    apply_threads()
    _reseed_numpy()
    warm.IN_WARM_CHILD = True
    status = 0
    try:
        from shrinkflow.cli import main

        main()
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except warm.FreshImports as handback:
        with contextlib.suppress(OSError):
            protocol.send_message(conn, restart=handback.env)
    except BaseException:
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return status


def _exit_status(code: object) -> int:
    """What ``sys.exit(code)`` makes a process's status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def apply_threads() -> None:
    """The job's thread count (OMP_NUM_THREADS, which Snakemake sets to the rule's threads),
    which a fresh process's frameworks take when they load: this server loaded them without
    it, so each loaded backend applies it now (``backends.base.use_job_threads``)."""
    from shrinkflow.backends.base import use_job_threads

    use_job_threads()


def _reseed_numpy() -> None:
    """A fresh process seeds numpy's global generator from the OS; forked children would all
    share the server's state (Python's ``random`` re-seeds itself after a fork)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def say(text: str) -> None:
    """One line of the server's log (its stderr), time-stamped."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", file=sys.stderr, flush=True)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m shrinkflow.warm.server SOCKET")
    # A fresh `shrinkflow` process has no working folder on sys.path; neither do the children.
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path.pop(0)
    try:
        idle_s = float(os.environ.get(warm.IDLE_ENV, warm.DEFAULT_IDLE_S))
    except ValueError:
        idle_s = warm.DEFAULT_IDLE_S
    serve(Path(sys.argv[1]), idle_s)


if __name__ == "__main__":
    main()
