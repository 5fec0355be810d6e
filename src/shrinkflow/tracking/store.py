"""Opening the tracking store: MLflow's settings and import, the client, the experiments.

A project logs to two experiments (``experiment_names``): ``tracking.experiment`` holds one run
per evaluated artefact (the sweep a user compares), ``<tracking.experiment>-jobs`` the run of
every other job (download ... report). Both are model-training experiments, so the MLflow UI
opens them on their runs rather than on its GenAI views.

``mlflow`` is imported inside functions, never at module import: it costs seconds, and the
Snakefile imports this package's helpers.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from shrinkflow.errors import ShrinkflowError
from shrinkflow.tracking.relocate import artifact_root, relocate
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


# What a job's first `open_store` imports beyond `import mlflow`: the tracking client, the SQL
# stores, alembic's schema check, tenacity's retries. A warm server (shrinkflow.warm) imports
# them once, so that opening a job's run costs its children ~0.3 s instead of ~4 s.
FIRST_USE_MODULES = (
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.tracking.sqlalchemy_workspace_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "sqlalchemy.dialects.sqlite",
    "alembic.command",
    "alembic.config",
    "alembic.runtime.migration",
    "alembic.script",
    "tenacity",
)


def preload() -> None:
    """Import what opening a store imports, without opening one (no file, no thread)."""
    import_mlflow()
    for name in FIRST_USE_MODULES:
        importlib.import_module(name)


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


JOBS_SUFFIX = "-jobs"  # the experiment of every job that is not an artefact's evaluation
NOTE_TAG = "mlflow.note.content"  # the description the MLflow UI shows (runs and experiments)
# The experiment tag the MLflow UI reads to choose its view; "custom_model_development" is its
# "Machine learning" kind (model training: runs, metrics, charts), not "genai_development".
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# MLflow 3.17's UI takes its view (GenAI or model training) from this query parameter of a page's
# URL, else from a per-browser setting that starts on GenAI; it does not read KIND_TAG then. A
# link into the UI carries it, so it opens on runs and metrics: `#/experiments/1/runs?<this>`.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def experiment_names(cfg: dict) -> tuple[str, str]:
    """(the artefacts' experiment, the jobs' experiment): ``tracking.experiment`` and
    ``<tracking.experiment>-jobs``."""
    name = cfg["tracking"]["experiment"]
    return name, f"{name}{JOBS_SUFFIX}"


def _experiment_tags(cfg: dict, jobs: bool) -> dict[str, str]:
    """The kind and the description of the artefacts' (or the jobs') experiment."""
    artefacts, job_runs = experiment_names(cfg)
    if jobs:
        note = (
            "shrinkflow's pipeline jobs (download, prepare, train, sensitivity, prune, finetune, "
            "quantize, summarize, report): one run per job with its params, per-epoch metrics "
            "and outputs; `shrinkflow.source_run_id` names the run that wrote its input. The "
            f"evaluated artefacts, one run each, are in experiment `{artefacts}`."
        )
    else:
        note = (
            "One run per evaluated artefact, named by what it is. Params are the sweep's axes "
            "(backend, model, stage, prune_method, target_sparsity, quant_method, seed, dataset), "
            "metrics its measurements (val and test top-1, sizes, latency, throughput, measured "
            "sparsity): select the runs and compare them. The jobs that made each artefact are "
            f"in experiment `{job_runs}`; `shrinkflow.source_run_id` names the one that wrote it."
        )
    return {KIND_TAG: MODEL_TRAINING, NOTE_TAG: note}


def experiment_id(
    client: MlflowClient, name: str, artifact_location: str | None, tags: dict[str, str]
) -> str:
    """The id of the active experiment ``name``, created with ``tags`` if it does not exist;
    an existing one gets those of ``tags`` it lacks (a store made before they existed)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    experiment = retry(lambda: client.get_experiment_by_name(name))
    if experiment is None:
        try:
            return retry(lambda: client.create_experiment(name, artifact_location, tags))
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
    for key, value in tags.items():
        if key not in experiment.tags:  # never overrides what a user set
            retry(lambda k=key, v=value: client.set_experiment_tag(experiment.experiment_id, k, v))
    return experiment.experiment_id


def open_store(cfg: dict, *, jobs: bool = False) -> tuple[MlflowClient, str]:
    """A client for the configured store and the id of the artefacts' experiment (``jobs``:
    the jobs' experiment), creating the store and both experiments if needed."""
    import_mlflow()
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    artifacts = None if db is None else artifact_root(db)
    if db is not None:
        relocate(db)  # a store copied or moved to another folder: its artefacts moved with it
    names = experiment_names(cfg)
    if db is not None and not all(has_experiment(db, name) for name in names):
        _create_sqlite_store(db, uri, cfg, artifacts)
    client = retry(lambda: MlflowClient(store_uri(uri)))
    return client, experiment_id(client, names[jobs], artifacts, _experiment_tags(cfg, jobs))


def _create_sqlite_store(db: Path, uri: str, cfg: dict, artifacts: str) -> None:
    """Create the schema and the experiments once, however many jobs start at the same moment.

    MLflow migrates an empty database in whichever process opens it first, unguarded, so the
    migration runs under a file lock. Jobs that waited for the lock find the work done and
    open their clients outside it, in parallel.
    """
    from mlflow import MlflowClient

    with creation_lock(db):
        names = experiment_names(cfg)
        if not all(has_experiment(db, name) for name in names):
            client = retry(lambda: MlflowClient(store_uri(uri)))
            for jobs, name in enumerate(names):
                experiment_id(client, name, artifacts, _experiment_tags(cfg, bool(jobs)))


def prepare_store(cfg: dict) -> None:
    """Create the store's schema and both experiments unless they exist (safe to race)."""
    open_store(cfg)
    open_store(cfg, jobs=True)


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
