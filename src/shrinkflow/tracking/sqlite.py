"""A SQLite store that many jobs (``--cores 8``) write to at once.

SQLite waits up to ``BUSY_TIMEOUT_S`` for another writer's lock; calls that still fail with
"database is locked" are retried with backoff (``retry``); the schema and the experiment are
created once under a file lock (``creation_lock``), and a finished store is recognised without
it (``has_experiment``).
"""

from __future__ import annotations

import logging
import random
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote

from shrinkflow.errors import ShrinkflowError

T = TypeVar("T")

BUSY_TIMEOUT_S = 60  # SQLite waits this long for another job's write lock before giving up
RETRY_BUDGET_S = 60  # then calls are retried for about this long before the job fails
LOCK_TIMEOUT_S = 300  # creating a fresh store takes seconds; minutes means a hung process
LOCKED = ("database is locked", "database table is locked")


class DropLockedErrors(logging.Filter):
    """MLflow logs every SQLite lock conflict as an error with a traceback; we retry those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in LOCKED)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are relative to the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def store_uri(uri: str) -> str:
    """The URI the client connects with: SQLite gets a long busy timeout unless one is given.

    MLflow sets a 20 s busy timeout on its own sessions, but not on the connections it uses to
    inspect and migrate the schema; SQLAlchemy's pysqlite dialect reads ``?timeout=`` for all.
    """
    if sqlite_path(uri) is not None and "?" not in uri:
        return f"{uri}?timeout={BUSY_TIMEOUT_S}"
    return uri


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from or during, is a lock conflict."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(text in str(seen) for text in LOCKED):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry(call: Callable[[], T]) -> T:
    """Run ``call``, retrying SQLite lock conflicts with jittered exponential backoff.

    Waits of 0.05, 0.1, 0.2, ... s, at most 4 s, each times a random 0.5 to 1.5 (colliding jobs
    retry apart), until the next wait would end past ``RETRY_BUDGET_S``: then the conflict is
    raised. Any other exception is raised at once. A failed SQLite write is rolled back whole,
    so repeating it cannot log anything twice.
    """
    from tenacity import Retrying, retry_if_exception, stop_before_delay, wait_exponential

    backoff = wait_exponential(multiplier=0.05, max=4.0)
    retrying = Retrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, Exception) and is_locked(exc)),
        wait=lambda state: backoff(state) * random.uniform(0.5, 1.5),
        stop=stop_before_delay(RETRY_BUDGET_S),
        reraise=True,
    )
    return retrying(call)


def has_experiment(db: Path, name: str) -> bool:
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


@contextmanager
def creation_lock(db: Path) -> Iterator[None]:
    """Hold the file lock beside ``db`` under which a fresh store is created (its folder is
    made first); a ShrinkflowError after ``LOCK_TIMEOUT_S``."""
    from filelock import FileLock, Timeout

    db.parent.mkdir(parents=True, exist_ok=True)
    lock = db.with_name(db.name + ".lock")
    try:
        with FileLock(lock, timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise ShrinkflowError(
            f"tracking: waited {LOCK_TIMEOUT_S} s for {lock}; another process holds it"
        ) from None
