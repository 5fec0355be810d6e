"""Snakemake after a crash: stale locks, and the reason a job failed, on the terminal.

Used by the Snakefile only (no Snakemake import here, so it is testable on its own).

* A killed ``snakemake`` (SIGKILL, a lost terminal, a reboot) leaves its lock files in
  ``.snakemake/locks``; the next run would stop and ask for ``--unlock``. ``release_stale_locks``
  removes them when no run that could hold them is alive: every ``snakemake`` records itself
  (host, pid, start time) while it runs, and a lock is only broken when every recorded run is on
  this host and dead, and no ``snakemake`` or ``shrinkflow`` process of this host still works in
  this folder. A run recorded on another host (a shared file system) is never second-guessed.
* A failed job's ``error: ...`` line goes to its log file; ``failed_job_errors`` collects those
  lines for the Snakefile's ``onerror`` hook, so the reason shows without ``--show-failed-logs``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

LOCKS = Path(".snakemake/locks")  # Snakemake's own lock folder (N.input.lock, N.output.lock)
OWNERS = Path(".snakemake/shrinkflow-runs")  # one record per live snakemake of this folder
_TOOLS = ("snakemake", "shrinkflow")  # processes that may still write this folder's outputs


def _start_time(pid: int) -> float | None:
    import psutil  # a dependency of snakemake

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def register_run(workdir: Path, argv: list[str]) -> Path:
    """Record this snakemake (host, pid, start time) until it exits; returns the record's path.

    ``snakemake --unlock`` (in ``argv``) is the user saying no other run is alive: it also drops
    the records of runs killed on other hosts, which this host cannot check.
    """
    if "--unlock" in argv:
        for path, _ in _recorded_runs(workdir):
            path.unlink(missing_ok=True)
    record = Path(workdir) / OWNERS / f"{socket.gethostname()}-{os.getpid()}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    entry = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}
    record.write_text(json.dumps(entry))
    atexit.register(lambda: record.unlink(missing_ok=True))
    return record


def _recorded_runs(workdir: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted((Path(workdir) / OWNERS).glob("*.json")):
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue  # half-written by a run killed at that moment: it names nobody alive
    return found


def _alive(entry: dict) -> bool:
    """Whether the recorded run is still this host's same process (not a reused pid)."""
    pid, start = entry.get("pid"), entry.get("start")
    if not isinstance(pid, int):
        return False
    now = _start_time(pid)
    return now is not None and (start is None or abs(now - start) < 1.0)


def _workers_here(workdir: Path) -> list[str]:
    """``snakemake``/``shrinkflow`` processes of this host (other than this one and its
    ancestors) whose working folder is ``workdir``: a live run, or jobs a killed one left."""
    import psutil

    here = Path(workdir).resolve()
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] in mine or not proc.info["cmdline"]:
            continue
        words = [Path(w).name for w in proc.info["cmdline"][:3]]
        if not any(tool in w for w in words for tool in _TOOLS):
            continue
        try:
            if Path(proc.cwd()).resolve() == here:
                found.append(f"{' '.join(proc.info['cmdline'][:3])} (pid {proc.info['pid']})")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def release_stale_locks(workdir: Path) -> str | None:
    """Remove ``.snakemake/locks`` if the run that held it is gone; say what was done.

    Returns a note for the terminal: the lock was removed, or why it was left (then Snakemake's
    own lock error follows, if the lock is in this run's way). None when there is no lock.
    """
    workdir = Path(workdir)
    locks = workdir / LOCKS
    if not any(locks.glob("*.lock")):
        return None
    host = socket.gethostname()
    me = f"{host}-{os.getpid()}.json"
    others = [(path, entry) for path, entry in _recorded_runs(workdir) if path.name != me]
    remote = sorted({e.get("host") for _, e in others if e.get("host") != host})
    if remote:
        return (
            f"note: {LOCKS} may belong to a snakemake running on {', '.join(map(str, remote))}; "
            "if none runs there, `snakemake --unlock` and then `snakemake` resume"
        )
    live = [f"snakemake (pid {e['pid']})" for _, e in others if _alive(e)]
    live += [w for w in _workers_here(workdir) if w not in live]
    if live:
        return f"note: {LOCKS} is held; still running in this folder: {', '.join(live)}"
    shutil.rmtree(locks, ignore_errors=True)
    for path, _ in others:
        path.unlink(missing_ok=True)
    return f"note: removed {LOCKS} left by a killed snakemake run; resuming"


def failed_job_errors(jobs: Iterable[object]) -> list[str]:
    """One line per failed job: its rule, its log and the log's last ``error: ...`` line (the
    CLI's one-line message), else the log's last line (a traceback's verdict)."""
    lines = []
    for job in jobs:
        rule = getattr(getattr(job, "rule", None), "name", "?")
        for log in getattr(job, "log", None) or []:
            try:
                text = Path(str(log)).read_text(errors="replace").splitlines()
            except OSError:
                continue
            errors = [line for line in text if line.startswith("error: ")]
            last = errors[-1] if errors else next((x for x in reversed(text) if x.strip()), "")
            if last:
                reason = last.removeprefix("error: ")
                lines.append(f"error: rule {rule} failed ({log}): {reason}")
    return lines
