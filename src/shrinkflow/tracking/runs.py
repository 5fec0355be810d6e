"""One MLflow run per pipeline job (``job_run``), continued rather than left behind.

Where a run goes: the run of an evaluated artefact (``axes`` given) goes to the artefacts'
experiment with the sweep's axes as its only params (the resolved config beside it as
``config.json``), so that the MLflow UI lists one comparable row per artefact; every other job
goes to the jobs' experiment with its full config as params (``store.experiment_names``). Runs
are flat: lineage is the tag ``shrinkflow.source_run_id`` (the run that wrote the job's input)
and a link to that run in the run's description, never ``mlflow.parentRunId``, which would fold
runs under their parents in the UI's run list.

A job that failed and is re-run in the same invocation (Snakemake's ``--retries``, a cluster's
requeue) continues its earlier attempt's run. A job killed outright leaves its open run named in
a marker beside its output (``tracking.refs.run_marker``); the next attempt at that output
continues that run (same params) or closes it as KILLED (changed params) before it opens its
own. Every call to the store is retried on SQLite lock conflicts (``tracking.sqlite.retry``) and
metrics, params and tags are written in batches.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from shrinkflow.invocation import TAG as INVOCATION_TAG
from shrinkflow.invocation import invocation_id
from shrinkflow.outputs import check_writable
from shrinkflow.progress import say
from shrinkflow.tracking.refs import mark_run, marked_run, remove_marker, run_marker
from shrinkflow.tracking.sqlite import retry
from shrinkflow.tracking.store import MODEL_TRAINING_VIEW, NOTE_TAG, existing_run, open_store

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

T = TypeVar("T")

STAGE_TAG = "shrinkflow.stage"
SOURCE_TAG = "shrinkflow.source_run_id"  # the run that wrote the job's input
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# An artefact run's params are its axes only: the digest of the resolved config tells a re-run
# with another config (another job) from a continued attempt, as the full params do elsewhere.
CONFIG_TAG = "shrinkflow.config_digest"
CONFIG_ARTIFACT = "config.json"  # an artefact run's resolved config


class _Terminated(SystemExit):
    """Raised by the SIGTERM handler, so a job killed by Snakemake or a cluster ends its run."""


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    """``{"data": {"image_size": 32}}`` → ``{"data.image_size": 32}``; lists stay values."""
    flat: dict[str, object] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_value(value: object) -> str:
    # JSON keeps lists and null readable and unambiguous ("null", not "None").
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class JobRun:
    """The MLflow run of one pipeline job; every call is retried on SQLite lock conflicts."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str) -> None:
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

    def _log_batch(self, **entities: list) -> None:
        self._client.log_batch(self.run_id, **entities)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log all ``metrics`` at ``step`` (0 when None) in one write."""
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        timestamp = int(time.time() * 1000)
        entries = [Metric(k, float(v), timestamp, step or 0) for k, v in metrics.items()]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            retry(lambda chunk=chunk: self._log_batch(metrics=chunk))

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log ``params``, nested mappings flattened to dotted keys."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        entries = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            retry(lambda chunk=chunk: self._log_batch(params=chunk))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            retry(lambda chunk=chunk: self._log_batch(tags=chunk))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder under its own name, into the run's artifacts."""
        retry(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def _end(self, status: str) -> None:
        retry(lambda: self._client.set_terminated(self.run_id, status))


def _git_commit() -> str | None:
    """HEAD of the git repository around the cwd, or None outside one (or without git)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _unfinished_attempt(
    client: MlflowClient,
    experiment_id: str,
    run_tags: Mapping[str, str],
    run_name: str,
    params: Mapping[str, object],
) -> Run | None:
    """The run of an earlier attempt at this job in this invocation that did not finish.

    Snakemake's ``--retries`` (or a cluster's requeue) re-runs a failed job in the same
    invocation: continuing that attempt's run keeps one run per job, where a fresh run would
    leave a FAILED (or, if the tracking server was gone, RUNNING) twin behind. The job is known
    by its tags (invocation, stage, node, source) and its run name; an attempt that logged other
    params (a user re-ran it by hand after a fix) is another job, as MLflow params are final.
    """
    keys = (INVOCATION_TAG, STAGE_TAG)
    if any("'" in run_tags[key] for key in keys):
        return None  # not expressible in a filter string; such ids are not ours anyway
    query = " and ".join(f"tags.`{key}` = '{run_tags[key]}'" for key in keys)
    query += " and attributes.status != 'FINISHED'"
    candidates = retry(
        lambda: client.search_runs(
            [experiment_id], query, max_results=100, order_by=["attributes.start_time DESC"]
        )
    )
    for run in candidates:
        same_source = run.data.tags.get(SOURCE_TAG) == run_tags.get(SOURCE_TAG)
        if same_source and _same_job(run, run_tags, run_name, params):
            return run
    return None


def _same_job(
    run: Run, run_tags: Mapping[str, str], run_name: str, params: Mapping[str, object]
) -> bool:
    """Whether ``run`` was opened by this job with these params: same tags (the invocation, the
    source and the git commit aside: a re-run may be a new invocation of newer code), the same
    name, and no param logged with another value (MLflow params are final)."""
    loose = {INVOCATION_TAG, SOURCE_TAG, NOTE_TAG, GIT_COMMIT_TAG}
    same_tags = all(run.data.tags.get(k) == v for k, v in run_tags.items() if k not in loose)
    logged = run.data.params
    same_params = all(logged.get(k, _param_value(v)) == _param_value(v) for k, v in params.items())
    return same_tags and same_params and run.info.run_name == run_name


def _config_digest(cfg: dict) -> str:
    flat = json.dumps(flatten(cfg), sort_keys=True, default=str)
    return hashlib.sha256(flat.encode()).hexdigest()[:16]


def _lineage(client: MlflowClient, source_run_id: str) -> dict[str, str]:
    """The tags that tie a run to the run that wrote its input: its id, and a description
    linking to it in the MLflow UI (when this store has it)."""
    tags = {SOURCE_TAG: source_run_id}
    source = existing_run(client, source_run_id)
    if source is not None:
        page = f"#/experiments/{source.info.experiment_id}/runs/{source_run_id}"
        link = f"{page}?{MODEL_TRAINING_VIEW}"
        tags[NOTE_TAG] = f"Input written by run [{source.info.run_name}]({link})."
    return tags


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception while the block runs, so the run is ended as KILLED."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may install signal handlers
        return

    def handler(signum: int, frame: object) -> None:
        raise _Terminated(128 + signum)  # the exit status a shell reports for a signal

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def job_run(
    cfg: dict,
    stage: str,
    *,
    out: Path | None = None,
    tags: dict[str, str] | None = None,
    source_run_id: str | None = None,
    run_id: str | None = None,
    run_name: str | None = None,
    axes: Mapping[str, object] | None = None,
) -> Iterator[JobRun]:
    """One MLflow run for one pipeline job.

    Args:
        cfg: the resolved params; logged flattened to dotted keys (an artefact run: as
            ``config.json``).
        stage: the pipeline stage, tagged ``shrinkflow.stage``.
        out: the job's output path. Checked writable before the store is opened, and the open
            run is named in ``run_marker(out)`` until it ends FINISHED or FAILED, so that an
            attempt killed outright is continued (same params) or closed as KILLED (changed
            params) by the next attempt, whichever invocation runs it.
        tags: more tags (``shrinkflow.backend``, ``shrinkflow.model``, ...).
        source_run_id: the run that produced this job's input (``shrinkflow.source_run_id``,
            and a link in the run's description).
        run_id: continue this run if the store has it (a resumed job keeps its run); without
            it, a killed attempt's run (``out``), else an unfinished run of an earlier attempt
            at this job in this invocation continues.
        run_name: shown in the MLflow UI; the stage when None.
        axes: given for an evaluated artefact: its run goes to the artefacts' experiment with
            these (the sweep's axes) as its only params; without, to the jobs' experiment.

    The run ends FINISHED when the block succeeds, FAILED when it raises, KILLED on Ctrl-C or
    SIGTERM; the exception is re-raised (SIGTERM exits with status 143).
    """
    marker = None
    if out is not None:
        check_writable(out)
        marker = run_marker(out)
    client, experiment_id = open_store(cfg, jobs=axes is None)
    run_name = run_name or stage
    run_tags = {
        STAGE_TAG: stage,
        INVOCATION_TAG: invocation_id(),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    if source_run_id:
        run_tags.update(_lineage(client, source_run_id))
    if commit := _git_commit():
        run_tags[GIT_COMMIT_TAG] = commit
    if axes is None:
        params = flatten(cfg)
    else:
        params = dict(axes)
        run_tags[CONFIG_TAG] = _config_digest(cfg)
    with _sigterm_raises():
        existing = existing_run(client, run_id) if run_id else None
        killed = marked_run(client, marker)
        if killed is not None and (existing is None or killed.info.run_id != existing.info.run_id):
            if existing is None and _same_job(killed, run_tags, run_name, params):
                existing = killed
            elif killed.info.status == "RUNNING":
                say(f"MLflow run {killed.info.run_id} of a killed earlier attempt: marked KILLED")
                retry(lambda: client.set_terminated(killed.info.run_id, "KILLED"))
        if existing is None:
            existing = _unfinished_attempt(client, experiment_id, run_tags, run_name, params)
        if existing is None:
            created = retry(
                lambda: client.create_run(experiment_id, tags=run_tags, run_name=run_name)
            )
            job = JobRun(client, created.info.run_id, created.info.experiment_id)
        else:
            job = JobRun(client, existing.info.run_id, existing.info.experiment_id)
            retry(lambda: client.update_run(job.run_id, status="RUNNING"))
            job.set_tags(run_tags)
            # MLflow params are immutable: a continued run keeps its first value of each.
            logged = existing.data.params
            changed = sorted(
                k for k in params.keys() & logged.keys() if logged[k] != _param_value(params[k])
            )
            if changed:
                say(f"MLflow run {job.run_id} keeps its first values of {', '.join(changed)}")
            params = {k: v for k, v in params.items() if k not in logged}
        try:
            mark_run(marker, job.run_id)
            if axes is not None:
                retry(lambda: client.log_dict(job.run_id, cfg, CONFIG_ARTIFACT))
            job.log_params(params)
            yield job
        except (KeyboardInterrupt, _Terminated):
            # The marker stays: the next attempt continues this run.
            _end_quietly(job, "KILLED")
            raise
        except BaseException:
            _end_quietly(job, "FAILED")
            remove_marker(marker)
            raise
        job._end("FINISHED")
        remove_marker(marker)


def _end_quietly(job: JobRun, status: str) -> None:
    """End a run while another exception propagates: never mask that exception."""
    try:
        job._end(status)
    except Exception as exc:
        say(f"warning: could not mark MLflow run {job.run_id} {status}: {exc}")
