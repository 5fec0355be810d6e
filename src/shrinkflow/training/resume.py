"""The resume state of a training job, as far as it is the same on every backend.

A job that re-trains (train, finetune, gradual pruning, QAT) saves a resume state after every
epoch: the driver's progress (``loop.train_epochs``: format, fingerprint, run_id, epoch,
best_val_top1, best_epoch, history) plus the backend's own (weights, optimizer, RNGs...), in the
backend's file format (``StateFile``). A later run of the job continues from it when it was
saved for the same fingerprint, i.e. the same params, data and model, and by code of the same
``state_format``; any other state is reported, deleted and training starts over. The state is
a cache: an unreadable one is reported and ignored rather than failing the job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from shrinkflow.data.prepared import PreparedData, sha256_file
from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say
from shrinkflow.stage_table import read_params


class StateFile(Protocol):
    """A backend's resume state on disk: the file that holds the progress fields."""

    path: Path
    # Bumped whenever the state's layout or the training procedure changes, so that an old
    # state is never resumed by code that would continue it differently.
    state_format: str

    def read(self) -> Any:
        """The saved state; a ShrinkflowError, OSError or ValueError when it cannot be read."""
        ...

    def delete(self) -> None:
        """Remove the state (all its files); nothing when there is none."""
        ...


def fingerprint_of(state_format: str, key: dict[str, Any]) -> str:
    """SHA-256 of ``key`` (plain JSON values) and the resume-state format."""
    blob = json.dumps({"format": state_format, **key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def job_fingerprint(
    stage: str,
    cfg: dict,
    point: dict[str, Any],
    state_format: str,
    data: PreparedData,
    model_file: Path | None = None,
) -> str:
    """Hash of all that decides a resumable job's result: the job's training seed (``cfg``'s
    ``seed``, as ``stages.job_config`` set it), exactly the params keys the stage table says
    its stage reads at this ``point`` of the sweep (``stage_table.read_params``: a gradual point
    reads ``prune.gradual`` and ``train``, never ``prune.structured`` nor the sweep lists), the
    point itself (model, method, sparsity, ...), the data and the input model file, and the
    resume state's format. A resume state is reused only on a match."""
    inputs = {"data": data.fingerprint}
    if model_file is not None:
        inputs["model"] = sha256_file(model_file)
    return fingerprint_of(
        state_format,
        {
            "stage": stage,
            "point": point,
            # the seed among the params, where the stages read it before seeds had folders,
            # so that a resume state saved then still matches
            "params": {
                "seed": cfg["seed"],
                **read_params(stage, cfg, {k: str(v) for k, v in point.items()}),
            },
            "inputs": inputs,
        },
    )


def read_state(file: StateFile) -> dict | None:
    """The state in ``file`` if it is one this code can continue, else None (said why)."""
    if not file.path.is_file():
        return None
    try:
        state = file.read()
    except (ShrinkflowError, OSError, ValueError) as e:
        say(f"{file.path}: unreadable resume state ignored ({e}); starting over")
        return None
    if not isinstance(state, dict) or state.get("format") != file.state_format:
        say(f"{file.path}: resume state of another format ignored")
        return None
    return state


def matching_state(file: StateFile, fingerprint: str, owner: bool = True) -> dict | None:
    """The state in ``file`` if it was saved for ``fingerprint``; else None, and the ``owner``
    (of several data-parallel processes, the one that writes the state) deletes it."""
    state = read_state(file)
    if state is not None and state.get("fingerprint") != fingerprint:
        if owner:
            say(f"{file.path}: saved for other params, data or model; starting over")
        state = None
    if state is None and owner:
        file.delete()  # a stale state must not be resumed by a later run either
    return state


def resumable_run_id(file: StateFile, fingerprint: str) -> str | None:
    """The MLflow run id saved with a state in ``file`` matching ``fingerprint``, else None."""
    state = read_state(file)
    if state is None or state.get("fingerprint") != fingerprint:
        return None
    return state.get("run_id")
