"""The files beside a job's output that name MLflow runs.

- ``run.json`` in each result folder: the run that produced the folder (``write_run_ref``).
- ``.<output name>.mlflow-run`` beside an output (``run_marker``): the run a job has open. A job
  killed outright (SIGKILL, a lost node, the OOM killer) runs no cleanup, so its run would stay
  RUNNING forever; the next attempt at that output, in whatever invocation, finds the marker and
  continues that run or closes it as KILLED (``tracking.runs.job_run``). ``.dvcignore`` hides
  markers from DVC, and neither tool declares them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import read_json, write_json
from shrinkflow.progress import say
from shrinkflow.tracking.store import existing_run

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

RUN_REF = "run.json"  # the file in each result folder naming the MLflow run that produced it
RUN_MARKER_SUFFIX = ".mlflow-run"  # `.<output name>.mlflow-run` beside an output: its open run


def write_run_ref(folder: Path, run_id: str, stage: str) -> None:
    """Record in ``folder/run.json`` which MLflow run produced the folder's contents."""
    write_json(Path(folder) / RUN_REF, {"run_id": run_id, "stage": stage})


def read_run_ref(folder: Path) -> str | None:
    """The run id recorded in ``folder/run.json``, or None when there is none."""
    path = Path(folder) / RUN_REF
    if not path.is_file():
        return None
    try:
        run_id = read_json(path)["run_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShrinkflowError(f"{path}: not a run reference ({exc!r})") from None
    if not isinstance(run_id, str):
        raise ShrinkflowError(f"{path}: run_id must be a string, got {run_id!r}")
    return run_id


def run_marker(out: Path) -> Path:
    """The scratch file beside a job's output that names the MLflow run the job has open.

    ``results/.../baseline/metrics.json`` -> ``results/.../baseline/.metrics.json.mlflow-run``.
    Outside the output itself, so Snakemake and DVC never delete it with the output before a
    re-run, and ``.dvcignore`` keeps it out of every hash.
    """
    out = Path(out)
    return out.parent / f".{out.name}{RUN_MARKER_SUFFIX}"


def mark_run(marker: Path | None, run_id: str) -> None:
    """Name ``run_id`` in ``marker`` (None: the job has no output to mark)."""
    if marker is not None:
        write_json(marker, {"run_id": run_id})


def marked_run(client: MlflowClient, marker: Path | None) -> Run | None:
    """The unfinished run a killed earlier attempt at this output left open, if any.

    A marker that cannot be read, names a run this store lacks (another store), or names a
    finished run (killed between ending the run and removing the marker) is ignored.
    """
    if marker is None or not marker.is_file():
        return None
    try:
        run_id = read_json(marker)["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(run_id, str):
        return None
    run = existing_run(client, run_id)
    return None if run is None or run.info.status == "FINISHED" else run


def remove_marker(marker: Path | None) -> None:
    if marker is not None:
        try:
            marker.unlink(missing_ok=True)
        except OSError as exc:  # scratch: a later attempt copes with a stale one
            say(f"warning: could not remove {marker}: {exc}")
