"""Opening the tracking store: MLflow's settings and import, the client, the experiment.

``mlflow`` is imported inside functions, never at module import: it costs seconds, and the
Snakefile imports this package's helpers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from shrinkflow.errors import ShrinkflowError
from shrinkflow.tracking.sqlite import (
    DropLockedErrors,
    creation_lock,
    has_experiment,
    retry,
    sqlite_path,
    store_uri,
)
from shrinkflow.tracking.uri import tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

ARTIFACT_DIR = "mlartifacts"  # beside a SQLite store, so artifacts never land in a random cwd

# MLflow's own settings, applied before it is imported unless the environment sets them.
MLFLOW_ENV = {
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


def import_mlflow() -> None:
    """Import MLflow with ``MLFLOW_ENV`` (where the environment does not say otherwise) and
    quieten its loggers."""
    for key, value in MLFLOW_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow  # noqa: F401  (configures MLflow's loggers, which we then quieten)

    # A fresh store announces each of its schema migrations at INFO.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    db_logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, DropLockedErrors) for f in db_logger.filters):
        db_logger.addFilter(DropLockedErrors())


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of the active experiment ``name``, created if it does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    experiment = retry(lambda: client.get_experiment_by_name(name))
    if experiment is None:
        try:
            return retry(lambda: client.create_experiment(name, artifact_location))
        except MlflowException as exc:
            # Another process (or a tracking server's other client) created it first.
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = retry(lambda: client.get_experiment_by_name(name))
    if experiment.lifecycle_stage != "active":
        raise ShrinkflowError(
            f"tracking.experiment: {name!r} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or choose another name"
        )
    return experiment.experiment_id


def open_store(cfg: dict) -> tuple[MlflowClient, str]:
    """A client for the configured store and the experiment's id, creating both if needed."""
    import_mlflow()
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    name = cfg["tracking"]["experiment"]
    db = sqlite_path(uri)
    artifacts = None if db is None else (db.parent / ARTIFACT_DIR).as_uri()
    if db is not None and not has_experiment(db, name):
        _create_sqlite_store(db, uri, name, artifacts)
    client = retry(lambda: MlflowClient(store_uri(uri)))
    return client, experiment_id(client, name, artifacts)


def _create_sqlite_store(db: Path, uri: str, name: str, artifacts: str) -> None:
    """Create the schema and the experiment once, however many jobs start at the same moment.

    MLflow migrates an empty database in whichever process opens it first, unguarded, so the
    migration runs under a file lock. Jobs that waited for the lock find the work done and
    open their clients outside it, in parallel.
    """
    from mlflow import MlflowClient

    with creation_lock(db):
        if not has_experiment(db, name):
            client = retry(lambda: MlflowClient(store_uri(uri)))
            experiment_id(client, name, artifacts)


def prepare_store(cfg: dict) -> None:
    """Create the store's schema and the experiment unless they exist (safe to race)."""
    open_store(cfg)


def existing_run(client: MlflowClient, run_id: str) -> Run | None:
    """The run ``run_id`` if the store has it and it is not deleted."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INVALID_PARAMETER_VALUE,
        RESOURCE_DOES_NOT_EXIST,
        ErrorCode,
    )

    try:
        run = retry(lambda: client.get_run(run_id))
    except MlflowException as exc:
        missing = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
        if exc.error_code in missing:
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None
