"""The store's SQLite connections: one writes, one reads, each guarded by a lock (request handlers
and the worker threads share them). WAL mode with synchronous=FULL so a committed row survives a
power cut; reads never wait on a write, ours or another process's.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .schema import migrate

# How long a write waits, all told, before it raises "database is locked": for the store's other
# writers (its write connection is one) and then for another process's write lock (an operator's
# sqlite3 shell, a backup). A request handler then answers 503, the worker retries (runner.py).
# Once bounded only SQLite's own wait, so five requests queued behind a locked database were
# answered after 2, 4, ... s; now each is answered within this bound.
BUSY_TIMEOUT_SECONDS = 2.0

Statement = tuple[str, tuple]


def is_busy(exc: BaseException) -> bool:
    """Whether `exc` is SQLite's "another connection holds the lock" (it passes; retry later)."""
    return isinstance(exc, sqlite3.OperationalError) and "database is locked" in str(exc)


class Database:
    """The connections and the three ways to use them: `query` (read), `execute` (one write),
    `transaction` (writes that land together or not at all). The store's tables are classes
    over this one (runs.py, checkpoints.py, jobs.py, sessions.py)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            migrate(self._db)
        self._reader = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False, isolation_level=None
        )
        self._reader.row_factory = sqlite3.Row
        self._reader.execute("PRAGMA query_only=1")
        self._read_lock = threading.Lock()

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()

    def trace(self, callback: Callable[[str], object] | None) -> None:
        """Call `callback` with the text of every statement either connection runs (None: stop)."""
        with self._read_lock:
            self._reader.set_trace_callback(callback)
        with self._lock:
            self._db.set_trace_callback(callback)

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def execute(self, sql: str, args: tuple = ()) -> int:
        """One write; returns the rows it changed."""
        with self.writing() as db:
            return db.execute(sql, args).rowcount

    def transaction(self, statements: list[Statement]) -> None:
        with self.writing() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    db.execute(sql, args)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """The write connection, within BUSY_TIMEOUT_SECONDS all told: the wait for the store's
        other writers is taken off SQLite's wait for another process's lock."""
        started = time.monotonic()
        if not self._lock.acquire(timeout=BUSY_TIMEOUT_SECONDS):
            raise sqlite3.OperationalError("database is locked (the store's other writes are waiting for it)")
        shortened = False
        try:
            left = BUSY_TIMEOUT_SECONDS - (time.monotonic() - started)
            if left < BUSY_TIMEOUT_SECONDS - 0.005:
                shortened = True
                self._db.execute(f"PRAGMA busy_timeout = {max(int(left * 1000), 1)}")
            yield self._db
        finally:
            try:
                if shortened:
                    self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            finally:
                self._lock.release()


def run_scope(column: str, owner: str, run_id: str | None) -> tuple[str, tuple]:
    """The WHERE condition (on a query joining `runs r`) for the owner's runs, or one of them:
    one run's lookups use the run's index instead of reading all of the owner's history."""
    if run_id is None:
        return "r.owner = ?", (owner,)
    return f"r.owner = ? AND {column} = ?", (owner, run_id)


def json_object(text: str | None) -> dict:
    """A stored JSON object; {} for none, or for text that is not one (a hand-edited row)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
