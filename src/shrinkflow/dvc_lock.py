"""After a successful `snakemake` run: record what it built in dvc.lock (`dvc commit`), so that
`dvc status` is clean and `dvc repro` runs nothing, but only when dvc.lock would tell the truth.

dvc.lock says: these outputs came from these inputs, this code and params.yaml's values. A
Snakemake run makes that true only when it brought the whole DAG of params.yaml up to date:

- no --configfile (other than params.yaml) and no --config: dvc.yaml's stages read params.yaml
  alone, and a preset's or an override's values are not in it;
- the default target (`all`), and no --until, --omit-from, --allowed-rules or --batch: every
  stage of dvc.yaml was brought up to date, not a part of the DAG;
- Snakemake's rerun triggers for what DVC tracks (REQUIRED_TRIGGERS; --rerun-triggers may
  leave out software-env only): a newer or changed input, a changed params value or command
  re-ran its jobs; and not --touch (nothing was built), nor --immediate-submit (the jobs have
  not run yet when Snakemake returns);
- dvc.yaml is what the stage table writes (`shrinkflow dvc-yaml --check`): it describes the
  DAG that ran.

Snakemake runs `onsuccess` only after jobs ran (not for a dry run, nor when nothing was to be
done) and only in the process that ran them. It does not re-run a job for an edited source file
that DVC lists as a dependency; a run that re-ran other jobs records the edited file with the
outputs it did not change, as `dvc commit -f` by hand would.

DVC is not needed for Snakemake to succeed: a project without a .dvc folder is skipped without a
word, and a failed `dvc commit` is one warning line (the run's outputs are complete and stay;
`dvc commit -f` records them later). `SHRINKFLOW_DVC_PUSH=1` (shrinkflow.remote) is the strict
way: there a failed commit fails the run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

HINT = "record the outputs later with `dvc commit -f`"
# Snakemake's rerun triggers (`--rerun-triggers` names) for what dvc.lock holds: input files
# (their modification times, the set of them), params values and the command.
REQUIRED_TRIGGERS = ("mtime", "input", "params", "code")


@dataclass(frozen=True)
class RunScope:
    """What a finished `snakemake` run covered, from its settings (workflow/rules/common.smk)."""

    # --configfile (other than params.yaml) and --config arguments, as the user typed them
    overrides: tuple[str, ...] = ()
    # the targets named on the command line (none: the default target)
    targets: tuple[str, ...] = ()
    default_target: str = "all"
    # options that leave part of the DAG out (--until, --omit-from, ...), as typed
    narrowing: tuple[str, ...] = ()
    # Snakemake's rerun triggers in effect (`--rerun-triggers` names)
    rerun_triggers: Collection[str] = REQUIRED_TRIGGERS
    touch: bool = False
    immediate_submit: bool = False


def skip_reason(scope: RunScope) -> str | None:
    """Why dvc.lock must not record this run's outputs (one clause), or None."""
    if scope.overrides:
        return (
            f"this run overrides params.yaml ({', '.join(scope.overrides)}), and dvc.lock "
            "holds params.yaml's values"
        )
    partial = [t for t in scope.targets if t != scope.default_target]
    if partial:
        return f"this run built only part of the DAG (targets: {', '.join(partial)})"
    if scope.narrowing:
        return f"this run left part of the DAG out ({', '.join(scope.narrowing)})"
    missing = [t for t in REQUIRED_TRIGGERS if t not in scope.rerun_triggers]
    if missing:
        return f"this run ignored changes of {', '.join(missing)} (--rerun-triggers)"
    if scope.touch:
        return "--touch built nothing"
    if scope.immediate_submit:
        return "--immediate-submit returns before the jobs have run"
    return None


def record(root: Path, scope: RunScope) -> str:
    """Record the outputs in ``root``/dvc.lock if ``scope`` allows it; the line to print
    ("" for a project that does not use DVC)."""
    if not (root / ".dvc").is_dir():
        return ""
    reason = skip_reason(scope)
    if reason:
        return f"note: dvc.lock not updated: {reason}"
    from shrinkflow import dvc_yaml
    from shrinkflow.errors import ShrinkflowError

    dvc_file = root / "dvc.yaml"
    try:
        expected = dvc_yaml.render_project(root)  # shaped by params.yaml (per-backend lists)
    except ShrinkflowError as exc:
        return f"warning: dvc.lock not updated: {exc}"
    if not dvc_file.is_file() or dvc_file.read_text() != expected:
        return (
            f"warning: dvc.lock not updated: {dvc_file.name} is not what the stage table "
            f"writes (run `shrinkflow dvc-yaml`, then {HINT})"
        )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "--force"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return f"warning: dvc.lock not updated: `dvc commit` failed: {_dvc_error(done)}; {HINT}"
    took = time.monotonic() - started
    return f"dvc.lock: this run's outputs recorded ({took:.1f} s); `dvc status` is clean"


def _dvc_error(done: subprocess.CompletedProcess) -> str:
    """DVC's last ERROR line, one line, without its prefix."""
    lines = (done.stderr or done.stdout or "").splitlines()
    errors = [line for line in lines if line.startswith("ERROR")]
    text = errors[-1] if errors else (lines[-1] if lines else f"exit status {done.returncode}")
    return " ".join(re.sub(r"^ERROR:\s*", "", text).split())
