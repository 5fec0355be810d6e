"""MLflow tracking: one run per pipeline job, safe with many jobs writing to one store at once.

The only module that talks to MLflow. ``mlflow`` is imported inside functions, never at module
import: it costs seconds, and the Snakefile imports this module's helpers.

Many jobs (``--cores 8``) write to one SQLite file at once, so: the schema and the experiment
are created once under a file lock; SQLite waits up to ``BUSY_TIMEOUT_S`` for another writer's
lock; calls that still fail with "database is locked" are retried with backoff; metrics are
written in batches.

A tracking server (``http(s)://``, e.g. ``make mlflow-server``) may restart while jobs log to it:
MLflow's HTTP client retries with the backoff set in ``_MLFLOW_ENV``, a job checks the server
answers before it starts (``shrinkflow.tracking_health``), and a job that failed and is re-run in
the same invocation continues its earlier attempt's run instead of leaving it behind.

A job killed outright (SIGKILL, a lost node, the OOM killer) runs no cleanup, so its run would stay
RUNNING forever. Each job therefore names its open run in a scratch file beside its output
(``run_marker``: ``.<output name>.mlflow-run``, hidden from DVC by ``.dvcignore`` and declared by
neither tool); the next attempt at that output, in whatever invocation, continues that run (same
params) or closes it as KILLED (changed params) before it opens its own.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote

from shrinkflow.errors import ShrinkflowError
from shrinkflow.invocation import TAG as INVOCATION_TAG
from shrinkflow.invocation import invocation_id
from shrinkflow.outputs import check_writable, read_json, write_json
from shrinkflow.progress import say

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

T = TypeVar("T")

RUN_REF = "run.json"  # the file in each result folder naming the MLflow run that produced it
RUN_MARKER_SUFFIX = ".mlflow-run"  # `.<output name>.mlflow-run` beside an output: its open run
ARTIFACT_DIR = "mlartifacts"  # beside a SQLite store, so artifacts never land in a random cwd
BUSY_TIMEOUT_S = 60  # SQLite waits this long for another job's write lock before giving up
RETRY_BUDGET_S = 60  # then calls are retried for about this long before the job fails
LOCK_TIMEOUT_S = 300  # creating a fresh store takes seconds; minutes means a hung process
STAGE_TAG = "shrinkflow.stage"
PARENT_TAG = "mlflow.parentRunId"  # the tag the MLflow UI uses to draw runs as a tree
GIT_COMMIT_TAG = "mlflow.source.git.commit"

# MLflow's own settings, applied before it is imported unless the environment sets them.
_MLFLOW_ENV = {
    # no usage reporting, nothing online
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # HTTP retries: refused connections, resets and 5xx answers are retried after waits of
    # 0, 2, 4, ..., 64, 120 s (urllib3's backoff, each wait capped at 120 s). 8 retries ride out a
    # tracking server that is away for up to ~4 minutes, as MLflow's 7 retries x factor 2 do;
    # factor 1 tries again sooner (2, 4, 8 s rather than 4, 8, 16 s), so a restart of seconds
    # holds a job up for seconds.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "8",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    # up to 1 s more per wait, at random, so the jobs of a sweep do not retry in lockstep
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    # seconds one request may wait for the server's answer (MLflow's default): a server stuck on
    # its database fails the request, which is then retried as above
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
}
_LOCKED = ("database is locked", "database table is locked")


class _Terminated(SystemExit):
    """Raised by the SIGTERM handler, so a job killed by Snakemake or a cluster ends its run."""


class _DropLockedErrors(logging.Filter):
    """MLflow logs every SQLite lock conflict as an error with a traceback; we retry those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _LOCKED)


def _import_mlflow() -> None:
    for key, value in _MLFLOW_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow  # noqa: F401  (configures MLflow's loggers, which we then quieten)

    # A fresh store announces each of its schema migrations at INFO.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    db_logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _DropLockedErrors) for f in db_logger.filters):
        db_logger.addFilter(_DropLockedErrors())


def tracking_uri(cfg: dict) -> str:
    """``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the cwd.

    A URI whose scheme MLflow builds no tracking store for is a one-line ShrinkflowError naming
    the key or the variable it came from (``check_store_uri``).
    """
    if cfg["tracking"]["uri"]:
        return check_store_uri(cfg["tracking"]["uri"], "tracking.uri")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return check_store_uri(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


# The schemes MLflow 3.17 builds a tracking store for (mlflow/tracking/_tracking_service/utils.py,
# _register_tracking_stores): a plain path and file: (file store), http(s) (a tracking server),
# databricks, and the SQLAlchemy databases of mlflow/store/db/db_types.py, each optionally with
# a driver (postgresql+psycopg2://). Plugins add schemes through the entry point group below.
# Unity Catalog URIs (databricks-uc, uc) are registered but refuse to be tracking stores.
_STORE_SCHEMES = ("", "file", "http", "https", "databricks")
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_STORE_PLUGIN_GROUP = "mlflow.tracking_store"
_STORE_URI_HELP = (
    "sqlite:///<file>.db, postgresql[+driver]://..., mysql[+driver]://..., "
    "mssql[+driver]://..., http(s)://<server>, file:///<folder> or a plain folder, databricks"
)


def check_store_uri(uri: str, where: str) -> str:
    """``uri`` if MLflow can keep runs there (judged by its scheme alone, without importing
    MLflow), else a ShrinkflowError naming ``where`` (the key or environment variable)."""
    from urllib.parse import urlparse

    scheme = uri if uri in ("databricks-uc", "uc") else urlparse(uri).scheme
    if len(scheme) == 1 and scheme.isalpha():
        scheme = ""  # a Windows drive letter: a path, as MLflow reads it
    base, _, driver = scheme.partition("+")
    if scheme in _STORE_SCHEMES or (base in _DATABASE_SCHEMES and "+" not in driver):
        return uri
    from importlib.metadata import entry_points

    if scheme in {ep.name for ep in entry_points(group=_STORE_PLUGIN_GROUP)}:
        return uri
    raise ShrinkflowError(
        f"{where}: {uri!r} has scheme {scheme!r}, which MLflow cannot keep runs in "
        f"(use {_STORE_URI_HELP})"
    )


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are relative to the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def _store_uri(uri: str) -> str:
    """The URI the client connects with: SQLite gets a long busy timeout unless one is given.

    MLflow sets a 20 s busy timeout on its own sessions, but not on the connections it uses to
    inspect and migrate the schema; SQLAlchemy's pysqlite dialect reads ``?timeout=`` for all.
    """
    if _sqlite_path(uri) is not None and "?" not in uri:
        return f"{uri}?timeout={BUSY_TIMEOUT_S}"
    return uri


def _is_locked(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if any(text in str(seen) for text in _LOCKED):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry(call: Callable[[], T]) -> T:
    """Run ``call``, retrying SQLite lock conflicts with jittered exponential backoff.

    A failed SQLite write is rolled back whole, so repeating it cannot log anything twice.
    """
    deadline = time.monotonic() + RETRY_BUDGET_S
    delay = 0.05
    while True:
        try:
            return call()
        except Exception as exc:
            pause = delay * random.uniform(0.5, 1.5)  # jitter: colliding jobs retry apart
            if not _is_locked(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        delay = min(2 * delay, 4.0)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    experiment = _retry(lambda: client.get_experiment_by_name(name))
    if experiment is None:
        try:
            return _retry(lambda: client.create_experiment(name, artifact_location))
        except MlflowException as exc:
            # Another process (or a tracking server's other client) created it first.
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = _retry(lambda: client.get_experiment_by_name(name))
    if experiment.lifecycle_stage != "active":
        raise ShrinkflowError(
            f"tracking.experiment: {name!r} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or choose another name"
        )
    return experiment.experiment_id


def _has_experiment(db: Path, name: str) -> bool:
    """Whether the experiment exists, so the store is complete and no lock is needed.

    The experiment is only created after MLflow has migrated the schema, so its row proves a
    finished store. Plain sqlite3 answers in milliseconds; the common case then skips queueing
    behind the lock while other jobs open their clients.
    """
    if not db.is_file():
        return False
    try:
        with closing(
            sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        ) as conn:
            row = conn.execute("SELECT 1 FROM experiments WHERE name = ?", (name,)).fetchone()
    except sqlite3.Error:
        return False
    return row is not None


def _open_store(cfg: dict) -> tuple[MlflowClient, str]:
    """A client for the configured store and the experiment's id, creating both if needed."""
    _import_mlflow()
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    name = cfg["tracking"]["experiment"]
    db = _sqlite_path(uri)
    artifacts = None if db is None else (db.parent / ARTIFACT_DIR).as_uri()
    if db is not None and not _has_experiment(db, name):
        _create_sqlite_store(db, uri, name, artifacts)
    client = _retry(lambda: MlflowClient(_store_uri(uri)))
    return client, _experiment_id(client, name, artifacts)


def _create_sqlite_store(db: Path, uri: str, name: str, artifacts: str) -> None:
    """Create the schema and the experiment once, however many jobs start at the same moment.

    MLflow migrates an empty database in whichever process opens it first, unguarded, so the
    migration runs under a file lock. Jobs that waited for the lock find the work done and
    open their clients outside it, in parallel.
    """
    from filelock import FileLock, Timeout
    from mlflow import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    lock = db.with_name(db.name + ".lock")
    try:
        with FileLock(lock, timeout=LOCK_TIMEOUT_S):
            if not _has_experiment(db, name):
                client = _retry(lambda: MlflowClient(_store_uri(uri)))
                _experiment_id(client, name, artifacts)
    except Timeout:
        raise ShrinkflowError(
            f"tracking: waited {LOCK_TIMEOUT_S} s for {lock}; another process holds it"
        ) from None


def prepare_store(cfg: dict) -> None:
    """Create the store's schema and the experiment unless they exist (safe to race)."""
    _open_store(cfg)


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
            _retry(lambda chunk=chunk: self._log_batch(metrics=chunk))

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log ``params``, nested mappings flattened to dotted keys."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        entries = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            _retry(lambda chunk=chunk: self._log_batch(params=chunk))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            _retry(lambda chunk=chunk: self._log_batch(tags=chunk))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder under its own name, into the run's artifacts."""
        _retry(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def _end(self, status: str) -> None:
        _retry(lambda: self._client.set_terminated(self.run_id, status))


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


def _existing_run(client: MlflowClient, run_id: str) -> Run | None:
    """The run ``run_id`` if the store has it and it is not deleted."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INVALID_PARAMETER_VALUE,
        RESOURCE_DOES_NOT_EXIST,
        ErrorCode,
    )

    try:
        run = _retry(lambda: client.get_run(run_id))
    except MlflowException as exc:
        missing = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
        if exc.error_code in missing:
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def _unfinished_attempt(
    client: MlflowClient,
    experiment_id: str,
    run_tags: Mapping[str, str],
    run_name: str | None,
    params: Mapping[str, object],
) -> Run | None:
    """The run of an earlier attempt at this job in this invocation that did not finish.

    Snakemake's ``--retries`` (or a cluster's requeue) re-runs a failed job in the same
    invocation: continuing that attempt's run keeps one run per job, where a fresh run would
    leave a FAILED (or, if the tracking server was gone, RUNNING) twin behind. The job is known
    by its tags (invocation, stage, node, parent) and its run name; an attempt that logged other
    params (a user re-ran it by hand after a fix) is another job, as MLflow params are final.
    """
    keys = (INVOCATION_TAG, STAGE_TAG)
    if any("'" in run_tags[key] for key in keys):
        return None  # not expressible in a filter string; such ids are not ours anyway
    query = " and ".join(f"tags.`{key}` = '{run_tags[key]}'" for key in keys)
    query += " and attributes.status != 'FINISHED'"
    candidates = _retry(
        lambda: client.search_runs(
            [experiment_id], query, max_results=100, order_by=["attributes.start_time DESC"]
        )
    )
    for run in candidates:
        same_parent = run.data.tags.get(PARENT_TAG) == run_tags.get(PARENT_TAG)
        if same_parent and _same_job(run, run_tags, run_name, params):
            return run
    return None


def _same_job(
    run: Run, run_tags: Mapping[str, str], run_name: str | None, params: Mapping[str, object]
) -> bool:
    """Whether ``run`` was opened by this job with these params: same tags (the invocation, the
    parent and the git commit aside: a re-run may be a new invocation of newer code), the same
    name, and no param logged with another value (MLflow params are final)."""
    loose = {INVOCATION_TAG, PARENT_TAG, GIT_COMMIT_TAG}
    same_tags = all(run.data.tags.get(k) == v for k, v in run_tags.items() if k not in loose)
    logged = run.data.params
    same_params = all(logged.get(k, _param_value(v)) == _param_value(v) for k, v in params.items())
    return same_tags and same_params and (run_name is None or run.info.run_name == run_name)


def run_marker(out: Path) -> Path:
    """The scratch file beside a job's output that names the MLflow run the job has open.

    ``results/.../baseline/metrics.json`` -> ``results/.../baseline/.metrics.json.mlflow-run``.
    Outside the output itself, so Snakemake and DVC never delete it with the output before a
    re-run, and ``.dvcignore`` keeps it out of every hash.
    """
    out = Path(out)
    return out.parent / f".{out.name}{RUN_MARKER_SUFFIX}"


def _marked_run(client: MlflowClient, marker: Path | None) -> Run | None:
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
    run = _existing_run(client, run_id)
    return None if run is None or run.info.status == "FINISHED" else run


def _remove_marker(marker: Path | None) -> None:
    if marker is not None:
        try:
            marker.unlink(missing_ok=True)
        except OSError as exc:  # scratch: a later attempt copes with a stale one
            say(f"warning: could not remove {marker}: {exc}")


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
    parent_run_id: str | None = None,
    run_id: str | None = None,
    run_name: str | None = None,
) -> Iterator[JobRun]:
    """One MLflow run for one pipeline job.

    Args:
        cfg: the resolved params; all of them are logged, flattened to dotted keys.
        stage: the pipeline stage, tagged ``shrinkflow.stage``.
        out: the job's output path. Checked writable before the store is opened, and the open
            run is named in ``run_marker(out)`` until it ends FINISHED or FAILED, so that an
            attempt killed outright is continued (same params) or closed as KILLED (changed
            params) by the next attempt, whichever invocation runs it.
        tags: more tags (``shrinkflow.backend``, ``shrinkflow.model``, ...).
        parent_run_id: the run that produced this job's input; the MLflow UI nests under it.
        run_id: continue this run if the store has it (a resumed job keeps its run); without
            it, a killed attempt's run (``out``), else an unfinished run of an earlier attempt
            at this job in this invocation continues.
        run_name: shown in the MLflow UI; MLflow picks a random one when None.

    The run ends FINISHED when the block succeeds, FAILED when it raises, KILLED on Ctrl-C or
    SIGTERM; the exception is re-raised (SIGTERM exits with status 143).
    """
    marker = None
    if out is not None:
        check_writable(out)
        marker = run_marker(out)
    client, experiment_id = _open_store(cfg)
    run_tags = {
        STAGE_TAG: stage,
        INVOCATION_TAG: invocation_id(),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    if parent_run_id:
        run_tags[PARENT_TAG] = parent_run_id
    if commit := _git_commit():
        run_tags[GIT_COMMIT_TAG] = commit
    params = flatten(cfg)
    with _sigterm_raises():
        existing = _existing_run(client, run_id) if run_id else None
        killed = _marked_run(client, marker)
        if killed is not None and (existing is None or killed.info.run_id != existing.info.run_id):
            if existing is None and _same_job(killed, run_tags, run_name, params):
                existing = killed
            elif killed.info.status == "RUNNING":
                say(f"MLflow run {killed.info.run_id} of a killed earlier attempt: marked KILLED")
                _retry(lambda: client.set_terminated(killed.info.run_id, "KILLED"))
        if existing is None:
            existing = _unfinished_attempt(client, experiment_id, run_tags, run_name, params)
        if existing is None:
            created = _retry(
                lambda: client.create_run(experiment_id, tags=run_tags, run_name=run_name)
            )
            job = JobRun(client, created.info.run_id, created.info.experiment_id)
        else:
            job = JobRun(client, existing.info.run_id, existing.info.experiment_id)
            _retry(lambda: client.update_run(job.run_id, status="RUNNING"))
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
            if marker is not None:
                write_json(marker, {"run_id": job.run_id})
            job.log_params(params)
            yield job
        except (KeyboardInterrupt, _Terminated):
            # The marker stays: the next attempt continues this run.
            _end_quietly(job, "KILLED")
            raise
        except BaseException:
            _end_quietly(job, "FAILED")
            _remove_marker(marker)
            raise
        job._end("FINISHED")
        _remove_marker(marker)


def _end_quietly(job: JobRun, status: str) -> None:
    """End a run while another exception propagates: never mask that exception."""
    try:
        job._end(status)
    except Exception as exc:
        say(f"warning: could not mark MLflow run {job.run_id} {status}: {exc}")


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


def register_model(
    cfg: dict,
    name: str,
    run_id: str,
    artifact_path: str,
    aliases: list[str],
    tags: Mapping[str, str],
    description: str,
) -> str:
    """Register the folder ``artifact_path`` of run ``run_id`` as a version of the registered
    model ``name`` and point ``aliases`` at it; returns the version.

    Re-running with the same run reuses its version (the registry gets no duplicates); an alias
    always moves to the newest choice.
    """
    from mlflow.exceptions import MlflowException

    client, _ = _open_store(cfg)
    run = _existing_run(client, run_id)
    if run is None:
        raise ShrinkflowError(
            f"report.registered_model: run {run_id} is not in the tracking store "
            f"{tracking_uri(cfg)}; report against the store the pipeline logged to, "
            "or set report.registered_model: null"
        )
    if not _retry(lambda: client.list_artifacts(run_id, artifact_path)):
        raise ShrinkflowError(
            f"report.registered_model: run {run_id} has no artifact {artifact_path!r} to register"
        )
    try:
        _retry(lambda: client.create_registered_model(name))
    except MlflowException as exc:
        if "already exists" not in str(exc).lower():
            raise
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    found = _retry(lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    same = [v for v in found if v.source == source]
    if same:
        version = max(same, key=lambda v: int(v.version)).version
    else:
        version = _retry(lambda: client.create_model_version(name, source, run_id=run_id)).version
    for key, value in tags.items():
        _retry(lambda key=key, value=value: client.set_model_version_tag(name, version, key, value))
    _retry(lambda: client.update_model_version(name, version, description=description))
    for alias in aliases:
        _retry(lambda alias=alias: client.set_registered_model_alias(name, alias, version))
    return str(version)
