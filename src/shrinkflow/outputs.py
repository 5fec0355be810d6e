"""Atomic outputs: a stage writes to a temporary sibling and renames it into place at the end.

No half-written file or folder is ever left under a final name, whatever kills the process.
Temporary siblings start with ``.tmp-`` so a later run (or a human) can tell them apart.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Write failures the user fixes outside shrinkflow (free space, permissions, a mount), said in
# words instead of a traceback. EDQUOT is missing on some platforms.
_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    getattr(errno, "EDQUOT", -1): "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError that free space, permissions or a mount would fix."""
    return isinstance(exc, OSError) and exc.errno in _WRITE_FAILURES


def describe_write_failure(exc: OSError, path: Path | str | None = None) -> str:
    """One line for a failed write (or a refused access): the path, what is wrong in words, and
    what to do.

    ``path`` is used when the error names no file (a full disk seen by a library's writer).
    """
    where = exc.filename if exc.filename is not None else path
    reason = _WRITE_FAILURES.get(exc.errno, exc.strerror or str(exc))
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        folder = _existing_folder(Path(where)) if where is not None else None
        free = f", {shutil.disk_usage(folder).free} bytes free" if folder else ""
        hint = f"{reason} (the file system holding {folder or where}{free}): free space and re-run"
    elif exc.errno == errno.EROFS:
        hint = f"{reason}: write the outputs to a writable location or remount it read-write"
    else:  # EACCES, EPERM: reading an input can fail so too
        hint = f"{reason}: check this user's rights on it"
    verb = "cannot access" if exc.errno in (errno.EACCES, errno.EPERM) else "cannot write"
    return f"{verb} {where}: {hint}" if where is not None else f"{verb}: {hint}"


def _existing_folder(path: Path) -> Path | None:
    """``path``'s nearest existing folder (itself if it is one)."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return None


def check_writable(final: Path) -> None:
    """Fail at once when ``final`` could not be written in place (read-only, forbidden, full).

    A stage calls this (through ``tracking.job_run``) before it computes anything, so a bad
    output location fails in a second, not after an hour of training. It creates the folder
    ``final`` goes in and a probe file there, named like a temporary sibling, so a kill in
    between leaves nothing a later run keeps. Raises the OSError, naming that folder; the CLI
    says it in one line (``describe_write_failure``), as it does for a write that fails later.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".tmp-{final.name}-", dir=final.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.filename is None or Path(exc.filename).name.startswith(".tmp-"):
            exc.filename = str(final.parent)  # name the folder, not the probe
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _clear_leftovers(final: Path) -> None:
    """Remove temporary siblings of ``final`` left by a killed earlier attempt (SIGKILL runs no
    cleanup). Only the job that owns ``final`` writes them, so none can belong to a live writer."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``final`` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    # mkdtemp creates 0700; outputs get the usual permissions (shared caches, clusters).
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(final)
    os.replace(tmp, final)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder that replaces ``final`` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(final)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{final.name}-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)


NULL_MEANS = "null_means"  # the key that says what a null written for a NaN stands for


def write_json(path: Path, obj: Any, *, nan_means: str | None = None) -> None:
    """Write ``obj`` as indented JSON, atomically.

    JSON has no NaN or Infinity (Python would write a bare ``NaN``, which strict readers refuse),
    so every writer decides: a non-finite float is refused with a ValueError naming its key path
    (a diverged value must have been stopped before it got here), unless the writer says with
    ``nan_means`` what an undefined value stands for (the val top-1 of an empty validation
    split): then each NaN is written as null, and a mapping at the top gets ``null_means`` saying
    why. Infinities are refused either way.
    """
    nulled: list[str] = []
    obj = _finite_json(obj, nan_means, path, "", nulled)
    if nulled and isinstance(obj, dict):
        obj = {**obj, NULL_MEANS: nan_means}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _finite_json(obj: Any, nan_means: str | None, path: Path, where: str, nulled: list) -> Any:
    """``obj`` with each NaN replaced by None (its key path appended to ``nulled``) where
    ``nan_means`` allows it; any other non-finite float is a ValueError naming its key path."""
    if isinstance(obj, dict):
        return {
            k: _finite_json(v, nan_means, path, f"{where}.{k}" if where else str(k), nulled)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [
            _finite_json(v, nan_means, path, f"{where}[{i}]", nulled) for i, v in enumerate(obj)
        ]
    if isinstance(obj, float) and not math.isfinite(obj):
        if math.isnan(obj) and nan_means is not None:
            nulled.append(where)
            return None
        raise ValueError(f"{path}: {where or 'the value'} is {obj}, which JSON cannot hold")
    return obj


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
