"""A SQLite store that moved with its project folder: its artefact locations follow it.

A SQLite store keeps its artefacts beside the database, in ``mlartifacts/``. MLflow records
every artefact location as an absolute URI and has no relative form: ``SqlAlchemyStore``
resolves a local artifact root to an absolute ``file://`` URI when it creates an experiment
(``resolve_uri_if_local``), and runs, LoggedModels and model versions inherit that prefix. The
``mlflow-artifacts:`` scheme is relative, but only a tracking server resolves it
(``--artifacts-destination``), and jobs write to the SQLite file directly. So a copied or moved
folder would open with every artefact pointing at the old one.

``relocate`` rewrites those recorded locations when the store is opened from another folder:
every URI under the folder its experiments were created in moves to the folder the database
is in now. It runs under the store's creation lock, in one SQLite transaction (all rows or
none), and costs one read-only query when nothing moved. ``open_store`` calls it for every
job; ``make mlflow-ui`` runs it (``main``) before the UI opens the store.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from shrinkflow.tracking.sqlite import BUSY_TIMEOUT_S, creation_lock

ARTIFACT_DIR = "mlartifacts"  # beside a SQLite store, so artifacts never land in a random cwd

# Every column in which MLflow 3.17's SQL schema records an artefact location.
LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def artifact_root(db: Path) -> str:
    """The URI of the artifact folder of the store ``db``: ``mlartifacts/`` beside it."""
    return (Path(db).parent / ARTIFACT_DIR).as_uri()


def relocate(db: Path) -> list[str]:
    """Point the artefact locations recorded in ``db`` at the folder ``db`` is in now; returns
    the folders (``file:`` URIs) they were moved from, none if the store has not moved."""
    db = Path(db)
    if not db.is_file():
        return []
    read_only = f"{db.as_uri()}?mode=ro"
    with closing(sqlite3.connect(read_only, uri=True, timeout=BUSY_TIMEOUT_S)) as conn:
        if not _stale_folders(conn, db):
            return []
    with creation_lock(db), closing(sqlite3.connect(db, timeout=BUSY_TIMEOUT_S)) as conn:
        conn.isolation_level = None  # transactions as written below
        conn.execute("BEGIN IMMEDIATE")  # the write lock now: nobody writes in between
        try:
            moved = _stale_folders(conn, db)  # again: another process may have done it
            here = db.parent.as_uri()
            for old in moved:
                for table, column in LOCATIONS:
                    conn.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE substr({column}, 1, ?) = ?",
                        (here, len(old) + 1, len(old) + 1, old + "/"),
                    )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return moved


def _stale_folders(conn: sqlite3.Connection, db: Path) -> list[str]:
    """The folders (``file:`` URIs) other than ``db``'s whose ``mlartifacts/`` holds the
    artefacts of one of the store's experiments: the store's folder before it moved."""
    suffix = "/" + ARTIFACT_DIR
    try:
        rows = conn.execute("SELECT DISTINCT artifact_location FROM experiments").fetchall()
    except sqlite3.Error:
        return []  # not an MLflow store (yet): MLflow creates the schema
    folders = {
        location.removesuffix(suffix)
        for (location,) in rows
        if location and location.startswith("file:") and location.endswith(suffix)
    }
    return sorted(folders - {db.parent.as_uri()})


def main(argv: list[str]) -> None:
    """Relocate the store ``argv[0]`` (default ``mlflow.db``), saying what moved: what
    ``make mlflow-ui`` runs before the UI opens the store."""
    db = Path(argv[0] if argv else "mlflow.db").resolve()
    for old in relocate(db):
        print(f"{db}: artefact locations moved from {old} to {db.parent.as_uri()}")
