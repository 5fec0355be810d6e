"""`make mlflow-server`: a shared MLflow tracking server with a PostgreSQL store.

    python -m shrinkflow.tracking.server [--folder .mlflow-server] [--port 5000] [--host ...]

With ``MLFLOW_BACKEND_STORE_URI`` set (``postgresql://user:password@host:port/db``) the server
uses that database. Otherwise it keeps a PostgreSQL cluster in ``<folder>/postgres``: created on
the first start (superuser and database ``mlflow``, a generated password in
``<folder>/postgres/password``), started on a free port (or ``--postgres-port``) and reused by
every later start, so nothing is lost. Artefacts live in ``<folder>/artifacts`` and are served:
jobs on other nodes upload and download them through the server, never through a shared path.

The store URI reaches ``mlflow server`` through its ``MLFLOW_BACKEND_STORE_URI`` variable, the
same as ``--backend-store-uri``, so the password never shows in the process list. Ctrl-C (or
SIGTERM) stops the MLflow server, then PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import quote

from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say
from shrinkflow.tracking.health import server_problem, shown_uri

DATABASE = "mlflow"
SUPERUSER = "mlflow"  # the cluster's superuser, whichever system user runs PostgreSQL
DEFAULT_FOLDER = Path(".mlflow-server")
DEFAULT_PORT = 5000  # MLflow's own default; $PORT or --port override it
POSTGRES_START_S = 60  # a cluster that crashed replays its WAL first: seconds, rarely more
MLFLOW_START_S = 180  # the first start migrates an empty database: ~30 s on two cores
STOP_S = 60  # both shut down in seconds; a minute means a hung process, which is then killed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def postgres_bin() -> Path:
    """The folder holding ``initdb`` and ``postgres``: ``$PATH``, else Debian's newest
    ``/usr/lib/postgresql/<version>/bin``."""
    if found := shutil.which("initdb"):
        return Path(found).parent
    debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    versions = sorted(debian, key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0)
    if not versions:
        raise ShrinkflowError(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
            "install it (Debian: apt-get install postgresql) or set MLFLOW_BACKEND_STORE_URI"
        )
    return versions[-1]


def _tail(path: Path, lines: int = 1) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class LocalPostgres:
    """A PostgreSQL cluster in ``folder`` (created on first use), run as a child process that
    listens on 127.0.0.1 only, with password authentication.

    PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` system user
    (Debian's package creates it), which then owns ``folder``.

    Args:
        durable: fsync every commit; tests turn it off for a throwaway cluster.
    """

    def __init__(self, folder: Path, *, durable: bool = True) -> None:
        self.folder = Path(folder).resolve()
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.durable = durable
        self.bin = postgres_bin()
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._owner = self._system_user()

    @staticmethod
    def _system_user() -> pwd.struct_passwd | None:
        """The user PostgreSQL runs as: ``postgres`` under root, else None (the caller)."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise ShrinkflowError(
                "PostgreSQL cannot run as root and there is no postgres user to run it as; "
                "install Debian's postgresql package or run as an ordinary user"
            ) from None

    def _as_owner(self) -> dict:
        """``subprocess`` arguments that run a command as the cluster's owner."""
        if self._owner is None:
            return {}
        return {"user": self._owner.pw_uid, "group": self._owner.pw_gid, "extra_groups": []}

    def _own(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    @property
    def password(self) -> str:
        path = self.folder / "password"
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ShrinkflowError(f"{path}: cannot read the cluster's password ({exc})") from None

    def uri(self, database: str = DATABASE) -> str:
        return (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/"
            f"{database}"
        )

    def ensure_cluster(self) -> None:
        """Create the cluster unless ``folder`` already holds one."""
        if (self.data / "PG_VERSION").is_file():
            return
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._own(self.folder)
        if self._owner is not None:
            writable = subprocess.run(["test", "-w", str(self.folder)], **self._as_owner())
            if writable.returncode != 0:
                raise ShrinkflowError(
                    f"{self.folder}: the postgres user cannot write here (a parent folder is "
                    "closed to other users); choose another --folder or set "
                    "MLFLOW_BACKEND_STORE_URI"
                )
        password_file = self.folder / "password"
        password_file.touch(mode=0o600)
        password_file.write_text(secrets.token_urlsafe(24) + "\n")
        self._own(password_file)
        command = [
            str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
            f"--pwfile={password_file}", "--auth=scram-sha-256",
            "--encoding=UTF8", "--locale=C",
        ]  # fmt: skip
        if not self.durable:
            command.append("--no-sync")
        result = subprocess.run(command, capture_output=True, text=True, **self._as_owner())
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ShrinkflowError(f"initdb {self.data} failed: {detail}")

    def _running_pid(self) -> int | None:
        """The pid in ``postmaster.pid`` if that process is alive (a crash leaves the file)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def _connect(self, database: str):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            password=self.password,
            dbname=database,
            connect_timeout=5,
        )

    def start(self, port: int) -> None:
        """Start PostgreSQL on 127.0.0.1:``port`` in its own session; return once it answers."""
        import psycopg2

        if pid := self._running_pid():
            raise ShrinkflowError(
                f"{self.data}: PostgreSQL already runs on this cluster (pid {pid}); "
                "stop the other tracking server first"
            )
        self.port = port
        options = {"listen_addresses": "127.0.0.1", "unix_socket_directories": ""}
        if not self.durable:
            options |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        command = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(port)]
        for key, value in options.items():
            command += ["-c", f"{key}={value}"]
        with self.log.open("a") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop it in order
                **self._as_owner(),
            )
        deadline = time.monotonic() + POSTGRES_START_S
        while True:
            try:
                self._connect("postgres").close()
                return
            except psycopg2.OperationalError as exc:
                problem = str(exc).strip().splitlines()[0]
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ShrinkflowError(
                    f"PostgreSQL did not start on port {port} ({problem}); "
                    f"its log {self.log} ends: {_tail(self.log)}"
                )
            time.sleep(0.2)

    def ensure_database(self, name: str = DATABASE) -> None:
        from psycopg2 import sql

        conn = self._connect("postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open sessions end, committed data is on disk."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGQUIT)  # immediate shutdown: recovery at next start
            process.wait()

    @contextmanager
    def running(self, port: int) -> Iterator[LocalPostgres]:
        self.start(port)
        try:
            yield self
        finally:
            self.stop()


@contextmanager
def mlflow_server(
    store_uri: str, artifacts: Path, host: str, port: int, workers: int | None
) -> Iterator[subprocess.Popen]:
    """``mlflow server`` in its own session, stopped (with its workers) on exit."""
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
        "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    if workers:
        command += ["--workers", str(workers)]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": store_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # uvicorn finishes requests in flight
            try:
                process.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait_until_serving(process: subprocess.Popen, uri: str) -> None:
    deadline = time.monotonic() + MLFLOW_START_S
    while (problem := server_problem(uri)) is not None:
        if process.poll() is not None:
            raise ShrinkflowError(f"mlflow server exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise ShrinkflowError(f"mlflow server at {uri} did not start ({problem})")
        time.sleep(0.5)


def serve(
    folder: Path, host: str, port: int, postgres_port: int | None, workers: int | None
) -> None:
    """Run the tracking server until Ctrl-C or SIGTERM (then stop it and PostgreSQL)."""
    if not _port_free(host, port):
        raise ShrinkflowError(
            f"--port {port}: {host}:{port} is in use (another server?); choose another port "
            "(PORT=... make mlflow-server)"
        )
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        store = os.environ.get("MLFLOW_BACKEND_STORE_URI")
        if not store:
            postgres = LocalPostgres(folder / "postgres")
            postgres.ensure_cluster()
            stack.enter_context(postgres.running(postgres_port or free_port()))
            postgres.ensure_database()
            store = postgres.uri()
            say(f"PostgreSQL {postgres.data} on 127.0.0.1:{postgres.port} (log {postgres.log})")
        artifacts = folder / "artifacts"
        process = stack.enter_context(mlflow_server(store, artifacts, host, port, workers))
        shown_host = socket.getfqdn() if host in ("0.0.0.0", "::") else host
        uri = f"http://{shown_host}:{port}"
        _wait_until_serving(process, f"http://127.0.0.1:{port}" if shown_host != host else uri)
        say(f"MLflow tracking server: {uri} (store {shown_uri(store)}, artefacts {artifacts})")
        print(f"export MLFLOW_TRACKING_URI={uri}", flush=True)
        say("Ctrl-C stops it (and PostgreSQL); the next start continues with the same data.")
        try:
            status = process.wait()
        except KeyboardInterrupt:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop
            say("stopping the MLflow server and PostgreSQL ...")
            return
        raise ShrinkflowError(f"mlflow server exited with status {status}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (systemd, a job scheduler) stops as Ctrl-C (SIGINT) does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shrinkflow.tracking.server", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--folder", type=Path, default=DEFAULT_FOLDER, help="data and artefacts (%(default)s)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other nodes too")
    parser.add_argument(
        "--port",
        type=int,
        default=os.environ.get("PORT", str(DEFAULT_PORT)),
        help=f"default: $PORT, else {DEFAULT_PORT}",
    )
    parser.add_argument("--postgres-port", type=int, help="default: a free port at each start")
    parser.add_argument("--workers", type=int, help="server processes (MLflow's default: 4)")
    args = parser.parse_args(argv)
    # Both stop it, whatever this process inherited: a shell that starts a command in the
    # background (`make mlflow-server &` in a script, nohup) leaves SIGINT ignored, and Python
    # then never turns Ctrl-C or `kill -INT` into KeyboardInterrupt.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        serve(args.folder, args.host, args.port, args.postgres_port, args.workers)
    except ShrinkflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted while starting", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
