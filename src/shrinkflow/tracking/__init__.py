"""MLflow tracking: one run per pipeline job, safe with many jobs writing to one store at once.

The only package that talks to MLflow. ``mlflow`` is imported inside functions, never at
import: it costs seconds, and the Snakefile imports ``tracking_uri`` and ``tracking.health``.

Many jobs (``--cores 8``) write to one SQLite file at once (``sqlite``): the schema and the
experiment are created once under a file lock; SQLite waits for another writer's lock; calls
that still fail with "database is locked" are retried with backoff; metrics are written in
batches.

Two experiments (``store``): ``tracking.experiment`` holds one run per evaluated artefact, its
params the sweep's axes and its metrics the measurements, so the MLflow UI's run list and Compare
view show the sweep; ``<tracking.experiment>-jobs`` holds every other job's run. Runs are flat,
linked by ``shrinkflow.source_run_id`` (``runs``).

A tracking server (``http(s)://``, e.g. ``make mlflow-server``, ``server``) may restart while
jobs log to it: MLflow's HTTP client retries with the backoff set in ``store.MLFLOW_ENV``, a job
checks the server answers before it starts (``health``), and a job that failed and is re-run in
the same invocation continues its earlier attempt's run instead of leaving it behind (``runs``).
A job killed outright names its open run in a marker beside its output (``refs.run_marker``),
which the next attempt continues or closes as KILLED.

Modules, one job each:

- ``uri``: which store (``tracking_uri``), checked without importing MLflow;
- ``sqlite``: many writers on one SQLite file (busy timeout, lock retries, creation lock);
- ``store``: MLflow's settings, the client and the two experiments (``prepare_store``);
- ``runs``: ``job_run``, the run of one job, continued across attempts;
- ``refs``: the files that name runs (``run.json``, run markers);
- ``relocate``: a SQLite store moved to another folder, its recorded artefact locations with it;
- ``registry``: ``register_model``, each backend's models under its own name;
- ``pyfunc_model``: the registered models' MLflow pyfunc (logged as code; imports MLflow);
- ``health``: is the tracking server there (one ``GET /health``);
- ``server``: ``make mlflow-server`` (``python -m shrinkflow.tracking.server``).

The names stages use are importable from the package itself.
"""

from shrinkflow.tracking.refs import (
    RUN_MARKER_SUFFIX,
    RUN_REF,
    read_run_ref,
    run_marker,
    write_run_ref,
)
from shrinkflow.tracking.registry import register_model
from shrinkflow.tracking.relocate import ARTIFACT_DIR
from shrinkflow.tracking.runs import (
    CONFIG_ARTIFACT,
    GIT_COMMIT_TAG,
    SOURCE_TAG,
    STAGE_TAG,
    JobRun,
    flatten,
    job_run,
)
from shrinkflow.tracking.store import MODEL_TRAINING_VIEW, experiment_names, prepare_store
from shrinkflow.tracking.uri import check_store_uri, tracking_uri

__all__ = [
    "ARTIFACT_DIR",
    "CONFIG_ARTIFACT",
    "GIT_COMMIT_TAG",
    "RUN_MARKER_SUFFIX",
    "RUN_REF",
    "SOURCE_TAG",
    "STAGE_TAG",
    "MODEL_TRAINING_VIEW",
    "JobRun",
    "check_store_uri",
    "experiment_names",
    "flatten",
    "job_run",
    "prepare_store",
    "read_run_ref",
    "register_model",
    "run_marker",
    "tracking_uri",
    "write_run_ref",
]
