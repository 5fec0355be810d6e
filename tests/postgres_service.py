"""A throwaway PostgreSQL for tests: a fresh cluster in a temporary folder on a free port with one
database, stopped and deleted afterwards.

It is shrinkflow.tracking.server's LocalPostgres (the code `make mlflow-server` runs), without
fsync: under root it runs as the postgres system user (PostgreSQL refuses root), in its own
session, listening on 127.0.0.1 with a generated password.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shrinkflow.errors import ShrinkflowError
from shrinkflow.tracking.server import LocalPostgres, free_port, postgres_bin


def postgres_missing() -> str | None:
    """Why PostgreSQL cannot run here, or None (for ``pytest.mark.skipif``)."""
    try:
        postgres_bin()
        LocalPostgres._system_user()
    except ShrinkflowError as exc:
        return str(exc)
    return None


def postgres_folder() -> Path:
    """A temporary folder the postgres user can enter: pytest's own tmp_path sits under a
    folder only its owner may open, which a cluster run by another user cannot live in."""
    folder = Path(tempfile.mkdtemp(prefix="shrinkflow-pg-"))
    folder.chmod(0o711)
    return folder


@contextmanager
def postgres_service(database: str = "mlflow") -> Iterator[str]:
    """Start PostgreSQL with ``database``; yield its ``postgresql://`` URI; stop and delete it."""
    folder = postgres_folder()
    try:
        cluster = LocalPostgres(folder / "cluster", durable=False)
        cluster.ensure_cluster()
        with cluster.running(free_port()):
            cluster.ensure_database(database)
            yield cluster.uri(database)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
