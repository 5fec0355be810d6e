"""The shared DVC remote: find it, check it before any compute is spent, push to it.

A remote is runtime configuration, like the executor: `dvc remote add -d NAME URL` writes it to
.dvc/config (shared through git) or, with --local, to .dvc/config.local (one machine, e.g.
credentials). It never goes in params.yaml. DVC resolves the remote here (all config levels,
relative paths, `remote://` references), so the check sees exactly what `dvc push` would use.

Checkpoints reach the remote once, from the process that ran the DAG (the Snakefile's
`onsuccess` when SHRINKFLOW_DVC_PUSH=1, `make push`, or `dvc repro && dvc push`), never from the
jobs themselves: DVC holds a lock on the repository for `dvc commit`/`dvc push`, so concurrent
pushes from jobs would fail with "Unable to acquire lock".
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from shrinkflow.errors import ShrinkflowError

PUSH_ENV = "SHRINKFLOW_DVC_PUSH"  # "1": the Snakefile checks the remote first, pushes on success
PROBE_PREFIX = ".shrinkflow-check-"  # the probe file written and removed to prove write access
CLOUD_TIMEOUT_S = 30.0  # an object store that has not answered by then is unreachable


@dataclass(frozen=True)
class Remote:
    """A configured DVC remote: its name, its URL as configured and its resolved location."""

    name: str
    url: str
    path: str  # the folder (local) or the bucket path (cloud) that DVC writes to
    protocol: str  # "local", "s3", "ssh", ...


def push_requested() -> bool:
    """Whether SHRINKFLOW_DVC_PUSH asks the Snakefile to push to the default remote."""
    return os.environ.get(PUSH_ENV, "").strip().lower() in ("1", "true", "yes")


def _config(root: Path):
    from dvc.config import Config, ConfigError

    dvc_dir = root / ".dvc"
    if not dvc_dir.is_dir():
        raise ShrinkflowError(f"{root}: not a DVC project (no .dvc folder); run `dvc init`")
    try:
        return Config(dvc_dir=str(dvc_dir))
    except ConfigError as exc:
        raise ShrinkflowError(f"{dvc_dir / 'config'}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def find_remote(root: Path, name: str | None = None) -> Remote:
    """The remote ``name``, or the default one (`dvc remote default`), as DVC resolves it."""
    from dvc.fs import get_cloud_fs

    config = _config(root)
    configured = sorted(config["remote"])
    name = name or config["core"].get("remote")
    if not name:
        raise ShrinkflowError(
            "no default DVC remote: set one with `dvc remote add -d NAME URL` "
            f"(configured: {', '.join(configured) or 'none'})"
        )
    if name not in configured:
        raise ShrinkflowError(
            f"dvc remote '{name}' is not configured (configured: {', '.join(configured) or 'none'})"
        )
    url = str(config["remote"][name]["url"])
    try:
        cls, _, path = get_cloud_fs(config, name=name)
    except Exception as exc:  # a missing plugin ("s3 is supported, but requires 'dvc-s3' to be
        # installed") or a malformed remote section: DVC's own message names it
        raise ShrinkflowError(f"dvc remote '{name}' ({url}): {_one_line(exc)}") from None
    return Remote(name=name, url=url, path=str(path), protocol=cls.protocol)


def check_remote(root: Path, name: str | None = None) -> str:
    """Prove that the remote can be written to now; return a one-line verdict.

    A local (shared file system) remote must be a writable folder, or not exist yet inside a
    writable folder (DVC creates it on the first push); a deeper missing path is refused, so
    an unmounted share or a typo is caught instead of a new tree growing on a node's own disk.
    Any other remote gets a probe object written and deleted through DVC's filesystem for it.
    Raises ShrinkflowError naming the remote and what is wrong.
    """
    remote = find_remote(root, name)
    where = f"dvc remote '{remote.name}' ({remote.url})"
    if remote.protocol != "local":
        _check_cloud(root, remote, where)
        return f"{where}: writable"
    folder = Path(remote.path)
    _check_folder(folder, where)
    return f"{where}: writable" + ("" if folder.exists() else " (created on the first push)")


def _check_folder(folder: Path, where: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise ShrinkflowError(f"{where}: {folder} is not a folder")
    target = folder if folder.is_dir() else folder.parent
    if not target.is_dir():
        blocker = next(p for p in reversed([target, *target.parents]) if not p.is_dir())
        if blocker.exists():
            raise ShrinkflowError(f"{where}: {blocker} is not a folder")
        raise ShrinkflowError(
            f"{where}: {blocker} does not exist (is the shared file system mounted?)"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=target)
    except OSError as exc:
        raise ShrinkflowError(f"{where}: cannot write in {target}: {exc.strerror}") from None
    os.close(handle)
    os.unlink(probe)


def _check_cloud(root: Path, remote: Remote, where: str) -> None:
    from dvc.fs import get_cloud_fs

    cls, fs_config, path = get_cloud_fs(_config(root), name=remote.name)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            fs = cls(**fs_config)
            probe_path = fs.join(path, f"{PROBE_PREFIX}{os.getpid()}")
            fs.pipe({probe_path: b""})
            fs.rm(probe_path)
            outcome.append(None)
        except BaseException as exc:  # reported below, in the caller's thread
            outcome.append(exc)

    # Object-store clients retry with back-off; a daemon thread bounds the whole check.
    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(CLOUD_TIMEOUT_S)
    if not outcome:
        raise ShrinkflowError(f"{where}: no answer within {CLOUD_TIMEOUT_S:.0f} s")
    if outcome[0] is not None:
        raise ShrinkflowError(f"{where}: cannot write a probe object: {_one_line(outcome[0])}")


def push(root: Path, name: str | None = None) -> None:
    """Record the workspace's outputs in dvc.lock (`dvc commit -f`) and push them.

    The commit records the outputs of a Snakemake run against params.yaml, so it is only
    right for a run of params.yaml as it is (the Snakefile refuses the push otherwise). An
    output that is missing (a partial run) stops the commit; everything stays in place.
    """
    remote = find_remote(root, name)
    check_remote(root, remote.name)
    # (not --quiet: it silences the ERROR line too)
    for args in (["commit", "--force"], ["push", "--remote", remote.name]):
        done = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=root, stderr=subprocess.PIPE, text=True
        )
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            reason = re.sub(r"^ERROR:\s*", "", errors[-1] if errors else done.stderr.strip())
            raise ShrinkflowError(
                f"dvc {args[0]} to remote '{remote.name}' failed: {reason} "
                "(the outputs stay in place; run `make push` again once fixed)"
            )


def require_pushable(root: Path, overrides: list[str]) -> str:
    """The Snakefile's start-up check when SHRINKFLOW_DVC_PUSH=1: the run must be one of
    params.yaml as it is (``overrides``: its --configfile/--config arguments) and the default
    remote must be writable. Returns the remote's verdict line."""
    if overrides:
        raise ShrinkflowError(
            f"{PUSH_ENV}=1 records this run in dvc.lock, which holds params.yaml's values, but "
            f"this run overrides them ({', '.join(overrides)}): put the overrides in "
            f"params.yaml, or unset {PUSH_ENV}"
        )
    return check_remote(root)
