"""A real one-node Slurm cluster with accounting for tests, started without systemd.

Debian's packages (``make services`` installs them): munged authenticates, MariaDB stores the
accounting that slurmdbd serves (the Slurm executor asks ``sacct`` for job states), slurmctld
schedules and slurmd runs the jobs on this machine (a node with its CPUs and memory, or more
where a test asks for a larger node: ``slurm_cluster``). Every daemon runs in the foreground
in its own process group, on free ports on 127.0.0.1, with its state, pid files and logs in one
folder (munged's socket in a folder of its own under /tmp); the context manager cancels what is
left and stops them all, whatever happened. Everything runs as root (``SlurmUser=root``), as on
the test machines. slurmctld registers the cluster with slurmdbd itself, with root's default
account, so no ``sacctmgr`` step is needed.

Clients find the cluster through ``SLURM_CONF`` (``SlurmCluster.env``), except ``srun`` inside
a job: the Slurm executor clears SLURM_CONF there, so the cluster links its folder at
/run/slurm/conf for its lifetime (``unavailable`` says why a machine cannot host it).
"""

from __future__ import annotations

import csv
import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow_server import free_port

NAME = "shrinkflow"  # the cluster's name in slurm.conf and in accounting
PARTITION = "debug"
# Program -> its Debian package; `make services` installs slurm-wlm (slurmctld, slurmd,
# slurm-client), slurmdbd (with its MySQL plugin), munge and mariadb-server (with its client).
PROGRAMS = {
    "munged": "munge",
    "mungekey": "munge",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "mariadb": "mariadb-client",
    "slurmdbd": "slurmdbd",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "srun": "slurm-client",
    "sacct": "slurm-client",
}
START_TIMEOUT_S = 60  # each daemon is up in 1-5 s on the test machine
STOP_TIMEOUT_S = 20  # slurmctld saves its state on SIGTERM: well under a second here


RUN_CONF = Path("/run/slurm/conf")  # where a configless slurmd links its copy of the config
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")  # where clients look before RUN_CONF


def unavailable() -> str | None:
    """Why this machine cannot host the test cluster (a skip reason), or None if it can."""
    search = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    missing = [f"{p} ({pkg})" for p, pkg in PROGRAMS.items() if not shutil.which(p, path=search)]
    if missing:
        return f"the Slurm test cluster needs {', '.join(missing)}; `make services` installs them"
    if os.geteuid() != 0:
        return "the Slurm test cluster runs its daemons as root (SlurmUser=root)"
    if SYSTEM_CONF.exists():
        return f"{SYSTEM_CONF} exists: srun inside the test's jobs would use that cluster instead"
    if RUN_CONF.exists():
        return f"{RUN_CONF} exists: another configless slurmd runs on this machine"
    return None


@dataclass(frozen=True)
class SlurmCluster:
    folder: Path
    conf: Path
    node: str
    cpus: int
    memory_mb: int

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm's clients (and for snakemake, which calls them)."""
        return {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin",
        }

    def run(self, *cmd: str) -> str:
        """Run a Slurm client command against this cluster; its stdout."""
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
        return result.stdout

    def accounting(self) -> list[dict[str, str]]:
        """Every job slurmdbd recorded (allocations only, not their steps)."""
        out = self.run(
            "sacct", "--allusers", "--allocations", "--parsable2",
            "--starttime", "2000-01-01", "--endtime", "now",
            "--format", "JobIDRaw,JobName,Comment,State,ExitCode,ReqTRES,Timelimit",
        )  # fmt: skip
        return list(csv.DictReader(io.StringIO(out), delimiter="|"))


def _node_line(min_cpus: int, min_memory_mb: int) -> tuple[str, int, int, str]:
    """(name, CPUs, MiB, NodeName line) of this machine: what ``slurmd -C`` measures, or at
    least ``min_cpus`` cores and ``min_memory_mb`` MiB (declared; see ``slurm_cluster``)."""
    out = subprocess.run(
        ["slurmd", "-C"], capture_output=True, text=True, check=True, env=_sbin_env()
    ).stdout
    line = next(text for text in out.splitlines() if text.startswith("NodeName="))
    fields = dict(item.split("=", 1) for item in line.split())
    name, cpus, memory_mb = fields["NodeName"], int(fields["CPUs"]), int(fields["RealMemory"])
    if cpus < min_cpus or memory_mb < min_memory_mb:
        cpus, memory_mb = max(cpus, min_cpus), max(memory_mb, min_memory_mb)
        line = (
            f"NodeName={name} CPUs={cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={cpus} "
            f"ThreadsPerCore=1 RealMemory={memory_mb}"
        )
    line = re.sub(r"\s*UpTime=\S+", "", line) + " NodeAddr=127.0.0.1 State=UNKNOWN"
    return name, cpus, memory_mb, line


def _sbin_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@contextmanager
def _daemon(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in the foreground in a process group of its own; stop the group on exit."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield process
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
                break
            except subprocess.TimeoutExpired:
                continue


def _wait(ready, what: str, process: subprocess.Popen, log: Path) -> None:
    """Poll ``ready()`` until it is true; fail with ``log``'s tail if the daemon died first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            state = "exited" if process.poll() is not None else "is not ready"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} {state}; {log}:\n{tail}")
        time.sleep(0.2)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _succeeds(*cmd: str, env: dict[str, str] | None = None) -> bool:
    return subprocess.run(cmd, capture_output=True, env=env).returncode == 0


def _start_munge(stack: ExitStack, folder: Path, env: dict[str, str], sock: Path) -> None:
    key = folder / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, env=env)
    key.chmod(0o600)
    log = folder / "munged.log"
    process = stack.enter_context(
        _daemon(
            [
                "munged", "--foreground", f"--socket={sock}", f"--key-file={key}",
                f"--pid-file={folder / 'munged.pid'}", f"--log-file={log}",
                f"--seed-file={folder / 'munged.seed'}",
            ],
            log, env,
        )
    )  # fmt: skip
    _wait(lambda: _succeeds("munge", "-n", "-S", str(sock), env=env), "munged", process, log)


def _start_mariadb(stack: ExitStack, folder: Path, env: dict[str, str]) -> tuple[int, str]:
    """A fresh MariaDB on 127.0.0.1; (port, password) of the user slurmdbd connects as."""
    data, sock, log = folder / "data", folder / "mysqld.sock", folder / "mariadbd.log"
    subprocess.run(
        [
            "mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
            "--auth-root-authentication-method=socket", "--skip-test-db",
        ],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    port = free_port()
    process = stack.enter_context(
        _daemon(
            [
                "mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={sock}",
                f"--port={port}", "--bind-address=127.0.0.1", "--user=root",
                f"--pid-file={folder / 'mariadbd.pid'}", f"--log-error={log}",
                "--innodb-buffer-pool-size=64M",  # accounting for a few dozen jobs
                "--innodb-lock-wait-timeout=900",  # slurmdbd's documented requirement
            ],
            log, env,
        )
    )  # fmt: skip
    client = ["mariadb", "--no-defaults", f"--socket={sock}", "--user=root"]
    _wait(lambda: _succeeds(*client, "-e", "SELECT 1", env=env), "mariadbd", process, log)
    password = secrets.token_hex(12)
    sql = (
        f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    )
    subprocess.run([*client, "-e", sql], check=True, env=env)
    return port, password


def _start_slurmdbd(
    stack: ExitStack, folder: Path, env: dict[str, str], munge: Path, db: tuple[int, str], port: int
) -> None:
    """slurmdbd reads slurmdbd.conf from the folder of ``$SLURM_CONF`` (it has no option)."""
    log = folder / "slurmdbd.log"
    _write(
        folder / "slurmdbd.conf",
        f"""AuthType=auth/munge
AuthInfo=socket={munge}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={port}
SlurmUser=root
PidFile={folder / "slurmdbd.pid"}
LogFile={log}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db[0]}
StorageUser=slurm
StoragePass={db[1]}
StorageLoc=slurm_acct_db
""",
        mode=0o600,  # slurmdbd refuses a config others can read (it holds the password)
    )
    process = stack.enter_context(_daemon(["slurmdbd", "-D"], log, env))
    _wait(lambda: _port_open(port), "slurmdbd", process, log)


def _slurm_conf(
    folder: Path, munge: Path, ctld_port: int, dbd_port: int, node_line: str, node: str
) -> str:
    return f"""ClusterName={NAME}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
MailProg=/bin/true
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge}
CredType=cred/munge
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd.log"}
# No cgroups: the tests run in containers without a writable cgroup hierarchy.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
# Not a password with slurmdbd: the MUNGE socket that authenticates to it (the default is
# munged's system socket, which these tests do not use).
AccountingStoragePass={munge}
# The Slurm executor names a job's rule and wildcards in its comment; keep it in accounting.
AccountingStoreFlags=job_comment
MpiDefault=none
ReturnToService=2
# The node's CPUs and memory are the ones declared below, even where they exceed the machine's
# (slurm_cluster's min_cpus and min_memory_mb): slurmd does not refuse to register.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
{node_line}
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@contextmanager
def slurm_cluster(
    folder: Path, min_cpus: int = 0, min_memory_mb: int = 0
) -> Iterator[SlurmCluster]:
    """Start munged, MariaDB, slurmdbd, slurmctld and slurmd with everything under ``folder``;
    yield the cluster once its node is idle; cancel its jobs and stop them all afterwards.

    The node has this machine's CPUs and memory, or at least ``min_cpus`` and ``min_memory_mb``
    where those are more: Slurm then runs as many jobs side by side as their requests fit in,
    as on a real node of that size, while the jobs share the machine's real cores (task/none
    binds no job to a core)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("state", "spool"):
        (folder / name).mkdir(exist_ok=True)
    node, cpus, memory_mb, line = _node_line(min_cpus, min_memory_mb)
    # munged wants every folder above its socket searchable by all; pytest's are private.
    munge_dir = Path(tempfile.mkdtemp(prefix="shrinkflow-munge-"))
    munge_dir.chmod(0o755)
    munge, ctld_port, dbd_port = munge_dir / "munge.socket", free_port(), free_port()
    conf = _write(
        folder / "slurm.conf", _slurm_conf(folder, munge, ctld_port, dbd_port, line, node)
    )
    cluster = SlurmCluster(folder, conf, node, cpus, memory_mb)
    env = cluster.env
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, munge_dir, ignore_errors=True)
        _start_munge(stack, folder, env, munge)
        _start_slurmdbd(stack, folder, env, munge, _start_mariadb(stack, folder, env), dbd_port)
        ctld = stack.enter_context(
            _daemon(["slurmctld", "-D", "-i"], folder / "slurmctld.out", env)
        )
        _wait(
            lambda: _succeeds("scontrol", "ping", env=env),
            "slurmctld",
            ctld,
            folder / "slurmctld.log",
        )
        slurmd = stack.enter_context(_daemon(["slurmd", "-D"], folder / "slurmd.out", env))
        _link_run_conf(stack, folder)
        stack.callback(_cancel_all, cluster)  # runs before the daemons stop
        _wait(lambda: _node_idle(cluster), "slurmd", slurmd, folder / "slurmd.log")
        yield cluster


def _link_run_conf(stack: ExitStack, folder: Path) -> None:
    """Link ``folder`` at RUN_CONF, where a configless slurmd keeps its copy of the config.

    The Slurm executor's job step clears every SLURM_* variable, SLURM_CONF too, before it runs
    ``srun`` inside the job (snakemake-executor-plugin-slurm-jobstep 0.6.1, ``run_job``), so
    srun looks where clients look without it: /etc/slurm/slurm.conf, then RUN_CONF.
    """
    if RUN_CONF.is_symlink() and not RUN_CONF.exists():
        RUN_CONF.unlink()  # left by a test cluster that was killed before its teardown
    if not RUN_CONF.parent.exists():
        RUN_CONF.parent.mkdir()
        stack.callback(RUN_CONF.parent.rmdir)  # after the link is gone (callbacks run LIFO)
    RUN_CONF.symlink_to(folder, target_is_directory=True)
    stack.callback(RUN_CONF.unlink)


def _node_idle(cluster: SlurmCluster) -> bool:
    try:
        return cluster.run("sinfo", "--noheader", "--Node", "--format=%T").strip() == "idle"
    except RuntimeError:
        return False


def _cancel_all(cluster: SlurmCluster) -> None:
    """Cancel every job left and give slurmd a moment to end their processes."""
    try:
        cluster.run("scancel", "--full", "--user=root")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while cluster.run("squeue", "--noheader").strip() and time.monotonic() < deadline:
            time.sleep(0.5)
    except (RuntimeError, subprocess.TimeoutExpired):
        pass  # the daemons are stopped next, whatever state they are in
