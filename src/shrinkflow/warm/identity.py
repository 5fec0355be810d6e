"""Which warm server may run a job: one per installation and import-time environment.

A server holds modules imported from the code and packages installed when it started, under
the environment it started with. It may serve a job only when all of that is what a fresh
process would import now, so its socket is named by a digest of:

- the interpreter (path and version) and every folder on ``sys.path`` as it is now: a folder's
  modification time changes when a package is installed into it or removed from it;
- every file of the shrinkflow package (path, size, modification time): an edit of the code;
- the environment variables read while importing (``IMPORT_ENV_PREFIXES``): TensorFlow's and
  Keras' switches, Python's own, the dynamic loader's.

Computing it costs a few milliseconds (stat calls, no reading), paid by every job.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import shrinkflow

# Variables a framework or the interpreter reads while importing: a server started without a
# job's value of one of them would run that job differently. Thread counts (OMP_NUM_THREADS,
# which Snakemake sets per job) are not among them: a warm child sets its own (server.py).
IMPORT_ENV_PREFIXES = ("TF_", "KERAS_", "XLA_", "TORCH", "PYTORCH_", "PYTHON", "LD_", "MALLOC_")
# Set by Snakemake per job from the rule's threads; read by OpenMP/BLAS when they load, so a
# server starts without them and each child applies its job's count (server.apply_threads).
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


@dataclass(frozen=True)
class ServerPaths:
    """Where the server of one identity listens, holds its lock and writes its log."""

    socket: Path
    lock: Path
    log: Path
    failed: Path  # written when its imports failed: no job starts another one in vain

    @classmethod
    def of(cls, socket: Path) -> ServerPaths:
        """The files beside ``socket``, named after it."""
        return cls(
            socket=socket,
            lock=socket.with_suffix(".lock"),
            log=socket.with_suffix(".log"),
            failed=socket.with_suffix(".failed"),
        )


# A Unix socket's path has at most 107 bytes on Linux; the key and suffix take 26.
MAX_FOLDER_CHARS = 80


def runtime_folder() -> Path:
    """A folder only this user can enter: $XDG_RUNTIME_DIR/shrinkflow, else (or where that
    path is too long for a socket) <tmp>/shrinkflow-<uid>."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "shrinkflow" if base else Path()
    if not base or len(str(folder)) > MAX_FOLDER_CHARS:
        folder = Path(tempfile.gettempdir()) / f"shrinkflow-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user")
    return folder


def digest(environ: Mapping[str, str], path: list[str] | None = None) -> str:
    """The identity of the code a job would import, under ``environ``, from ``path``."""
    h = hashlib.sha256()
    h.update(f"{sys.executable}\0{sys.version}\0".encode())
    for entry in path if path is not None else sys.path:
        try:
            h.update(f"{entry}\0{os.stat(entry or '.').st_mtime_ns}\0".encode())
        except OSError:
            h.update(f"{entry}\0-\0".encode())
    package = Path(shrinkflow.__file__).parent
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            h.update(f"{root}/{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    for name in sorted(environ):
        if name.startswith(IMPORT_ENV_PREFIXES):
            h.update(f"{name}={environ[name]}\0".encode())
    return h.hexdigest()[:20]


def server_paths(environ: Mapping[str, str], path: list[str] | None = None) -> ServerPaths:
    return ServerPaths.of(runtime_folder() / f"{digest(environ, path)}.sock")
