"""One id per pipeline invocation, shared by every job it runs (MLflow tag
``shrinkflow.invocation``), so the runs of one `snakemake` or `dvc repro` can be told apart from
the next one's in the MLflow UI.

The Snakefile sets ``SHRINKFLOW_INVOCATION_ID`` once and declares it in ``envvars``, so local
jobs and cluster jobs inherit it; ``make run`` and ``make repro`` set it too. Without it, a job
takes the identity of the program that launched it: ``dvc repro`` runs each stage through a
shell, so the nearest ancestor that is not a shell is the ``dvc`` process, the same for all of
its stages and different for the next invocation.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

ENV = "SHRINKFLOW_INVOCATION_ID"
TAG = "shrinkflow.invocation"
_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "fish", "busybox", "env", "time", "timeout"}


def new_invocation_id() -> str:
    """A fresh id that sorts by start time: ``20261122T101500-3f2a9c``."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def invocation_id() -> str:
    """``$SHRINKFLOW_INVOCATION_ID``, else an id derived from the launching process."""
    return os.environ.get(ENV) or _launcher_id() or new_invocation_id()


def _launcher_id() -> str | None:
    """``launcher-<hash>`` of the nearest non-shell ancestor's pid and start time (Linux /proc);
    None where /proc cannot tell."""
    pid = os.getppid()
    for _ in range(16):  # a chain of wrappers deeper than this is not a launcher worth naming
        stat = _stat(pid)
        if stat is None:
            return None
        name, parent, started = stat
        if name not in _SHELLS or parent <= 1:
            boot = _read("/proc/sys/kernel/random/boot_id") or ""
            digest = hashlib.sha1(f"{boot}:{pid}:{started}".encode()).hexdigest()[:12]
            return f"launcher-{digest}"
        pid = parent
    return None


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(command name, parent pid, start time in clock ticks since boot) of ``pid``."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The name is in parentheses and may itself contain spaces or parentheses.
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, int(fields[1]), int(fields[19])


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None
