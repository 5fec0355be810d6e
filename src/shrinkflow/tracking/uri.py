"""Which tracking store the jobs log to, judged without importing MLflow."""

from __future__ import annotations

import os
from pathlib import Path

from shrinkflow.errors import ShrinkflowError


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
