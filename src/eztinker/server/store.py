"""SQLite record of runs, jobs and checkpoints: what must survive a restart.

Two connections, each guarded by a lock (request handlers and the worker threads share them):
one writes, one reads. WAL mode with synchronous=FULL so a committed row survives a power cut;
reads never wait on a write, ours or another process's.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import EllipsisType
from typing import Any

from ..backend.results import JobKind
from ..types import CheckpointInfo, JobInfo, JobStatus, LoraConfig, RunInfo
from .retention import RetentionPolicy, expire

# How long a write waits, all told, before it raises "database is locked": for the store's other
# writers (its write connection is one) and then for another process's write lock (an operator's
# sqlite3 shell, a backup). A request handler then answers 503, the worker retries (runner.py).
# Once bounded only SQLite's own wait, so five requests queued behind a locked database were
# answered after 2, 4, ... s; now each is answered within this bound.
BUSY_TIMEOUT_SECONDS = 2.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    base_model TEXT NOT NULL,
    lora TEXT NOT NULL,
    seed INTEGER NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    restored_from TEXT,
    resume_from TEXT,  -- checkpoint the live state was last saved to or loaded from
    resume_path TEXT,  -- after a load: the private snapshot of it to restore from (runner.py)
    created_at REAL NOT NULL,
    deleted_at REAL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    step INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    run_id TEXT,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS sessions (  -- Tinker client sessions
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS samplers (  -- Tinker sampling sessions: a base model, or a saved adapter
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    base_model TEXT NOT NULL,
    checkpoint TEXT,  -- '<run_id>/<name>'; NULL: the bare base model
    model_path TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS training_log (  -- what each forward_backward / optim_step reported: a run's curves
    job_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,  -- the optimizer step the job belongs to: a gradient goes into the run's step + 1
    kind TEXT NOT NULL,
    loss REAL,              -- forward_backward: summed over the batch
    num_tokens INTEGER,     -- forward_backward: positions that carried loss
    weight_sum REAL,        -- forward_backward, cross_entropy: the sum of its weights (the loss's denominator)
    grad_norm REAL,         -- optim_step
    learning_rate REAL,     -- optim_step
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS training_log_run ON training_log(run_id, step);
CREATE TABLE IF NOT EXISTS evaluations (  -- harness results (lm-eval) of a run's adapter or checkpoint, as reported
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    checkpoint TEXT,        -- its name; NULL: the run's live adapter
    step INTEGER NOT NULL,  -- the adapter's optimizer step
    report TEXT NOT NULL,   -- JSON: harness, tasks, scores, config
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_run ON evaluations(run_id, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at);
CREATE TABLE IF NOT EXISTS idempotency_keys (  -- keys of expired jobs, kept idempotency_ttl_seconds (retention.py)
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    request_hash TEXT,
    status TEXT NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
);
"""
# After the columns added since the first schema: retention reads sizes from the index alone
# (a column stored after a large result would make SQLite walk the result's overflow pages).
LATE_INDEXES = "CREATE INDEX IF NOT EXISTS jobs_owner_results ON jobs(owner, finished_at, result_bytes);"

# Checkpoint columns added since the first schema: `auto` 1 for a snapshot the server saved
# unnamed (only those are pruned), `expires_at` when the server deletes it (NULL: never), `public`
# 1 when other users may load and sample it, `meta` JSON (the protocol's own: user metadata...).
CHECKPOINT_COLUMNS = (
    ("checkpoints", "auto", "INTEGER NOT NULL DEFAULT 0"),
    ("checkpoints", "expires_at", "REAL"),
    ("checkpoints", "public", "INTEGER NOT NULL DEFAULT 0"),
    ("checkpoints", "meta", "TEXT"),
)

INTERRUPTED = "interrupted: the server stopped before this job finished; its effect was not applied"


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


def is_busy(exc: BaseException) -> bool:
    """Whether `exc` is SQLite's "another connection holds the lock" (it passes; retry later)."""
    return isinstance(exc, sqlite3.OperationalError) and "database is locked" in str(exc)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._add_missing_columns()
            self._db.executescript(LATE_INDEXES)
        self._reader = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False, isolation_level=None
        )
        self._reader.row_factory = sqlite3.Row
        self._reader.execute("PRAGMA query_only=1")
        self._read_lock = threading.Lock()

    def _add_missing_columns(self) -> None:
        """Columns added since the first schema, for databases made before them."""
        for table, column, kind in (
            ("jobs", "error_category", "TEXT"),
            ("runs", "metadata", "TEXT"),
            ("runs", "resume_path", "TEXT"),
            ("training_log", "weight_sum", "REAL"),
            ("jobs", "result_bytes", "INTEGER"),
            *CHECKPOINT_COLUMNS,
        ):
            names = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in names:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                if (table, column) == ("checkpoints", "auto"):
                    # Made before the column: a sampler snapshot the server saved unnamed is the one an
                    # unnamed sampling session (no model_path) samples from.
                    self._db.execute(
                        "UPDATE checkpoints SET auto = 1 WHERE run_id || '/' || name IN"
                        " (SELECT checkpoint FROM samplers WHERE model_path IS NULL AND checkpoint IS NOT NULL)"
                    )

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def _execute(self, sql: str, args: tuple = ()) -> int:
        with self._writing() as db:
            return db.execute(sql, args).rowcount

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
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

    # ------------------------------------------------------------------------------ runs
    def add_run(
        self, run_id: str, owner: str, base_model: str, lora: LoraConfig, seed: int, metadata: dict | None = None
    ) -> None:
        self._execute(
            "INSERT INTO runs (id, owner, base_model, lora, seed, created_at, metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_id, owner, base_model, lora.model_dump_json(), seed, time.time(), json.dumps(metadata or {})),
        )

    def run_row_any(self, run_id: str) -> sqlite3.Row | None:
        """A run's row, deleted or not."""
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        return rows[0] if rows else None

    def live_runs(self, owner: str | None = None) -> list[sqlite3.Row]:
        if owner is None:
            return self._query("SELECT * FROM runs WHERE deleted_at IS NULL ORDER BY created_at")
        return self._query("SELECT * FROM runs WHERE deleted_at IS NULL AND owner = ? ORDER BY created_at", (owner,))

    def run_row(self, run_id: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM runs WHERE id = ? AND deleted_at IS NULL", (run_id,))
        return rows[0] if rows else None

    def run_owner(self, run_id: str) -> str | None:
        """Owner of a run, deleted or not (its checkpoints outlive it)."""
        rows = self._query("SELECT owner FROM runs WHERE id = ?", (run_id,))
        return rows[0]["owner"] if rows else None

    def set_run_state(self, run_id: str, step: int, restored_from: str | None | EllipsisType = ...) -> None:
        if restored_from is ...:
            self._execute("UPDATE runs SET step = ? WHERE id = ?", (step, run_id))
        else:
            self._execute("UPDATE runs SET step = ?, restored_from = ? WHERE id = ?", (step, restored_from, run_id))

    def record_restore(self, run_id: str, step: int, restored_from: str | None) -> None:
        """In one transaction: a run rebuilt after a crash (or its worker's loss) at `step`, and its
        curve cut back to that step: what was logged after it belongs to the life the crash ended,
        and its re-run must not count twice."""
        self._transaction(
            [
                ("UPDATE runs SET step = ?, restored_from = ? WHERE id = ?", (step, restored_from, run_id)),
                ("DELETE FROM training_log WHERE run_id = ? AND step > ?", (run_id, step)),
            ]
        )

    def set_resume_point(self, run_id: str, checkpoint_ref: str) -> None:
        """After a restart the run is rebuilt from this checkpoint (its last save or load)."""
        self._execute("UPDATE runs SET resume_from = ? WHERE id = ?", (checkpoint_ref, run_id))

    def mark_run_deleted(self, run_id: str) -> None:
        self._execute("UPDATE runs SET deleted_at = ? WHERE id = ?", (time.time(), run_id))

    def run_info(self, row: sqlite3.Row, **live) -> RunInfo:
        """The run as stored; `live`: what the service adds (status, last loss, last activity)."""
        return RunInfo(
            id=row["id"],
            base_model=row["base_model"],
            lora=LoraConfig.model_validate_json(row["lora"]),
            step=row["step"],
            created_at=_ts(row["created_at"]),
            restored_from=row["restored_from"],
            checkpoints=[
                c
                for c in self.checkpoints(row["id"], include_auto=False)
                if c.expires_at is None or c.expires_at.timestamp() > time.time()
            ],  # expired: unlisted at once
            **live,
        )

    # ----------------------------------------------------------------------- checkpoints
    def record_save(
        self, job_id: str, run_id: str, name: str, path: str, step: int, lifecycle: CheckpointLifecycle | None = None
    ) -> CheckpointInfo:
        """In one transaction: the checkpoint's row, the run's resume point (a save with the
        optimizer state only: a restart restores exactly what was saved), the job completed."""
        now, life = time.time(), lifecycle or CheckpointLifecycle()
        expires_at = None if life.ttl_seconds is None else now + life.ttl_seconds
        info = CheckpointInfo(
            run_id=run_id, name=name, path=path, step=step, created_at=_ts(now), expires_at=_ts(expires_at)
        )
        resume = [("UPDATE runs SET resume_from = ?, resume_path = NULL WHERE id = ?", (f"{run_id}/{name}", run_id))]
        self._transaction(
            [
                (
                    "INSERT OR REPLACE INTO checkpoints (run_id, name, path, step, created_at, auto, "
                    "expires_at, public, meta)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                    (run_id, name, path, step, now, int(life.auto), expires_at, json.dumps(life.meta)),
                ),
                *(resume if life.with_optimizer else []),
                *self._completion(job_id, info.model_dump_json()),
            ]
        )
        return info

    def record_load(
        self, job_id: str, run_id: str, step: int, checkpoint_ref: str, result_json: str, snapshot: str
    ) -> None:
        """In one transaction: the run's step and resume point (`snapshot`, the data-dir-relative
        copy of `checkpoint_ref` it loaded), the job completed."""
        self._transaction(
            [
                (
                    "UPDATE runs SET step = ?, restored_from = ?, resume_from = ?, resume_path = ? WHERE id = ?",
                    (step, checkpoint_ref, checkpoint_ref, snapshot, run_id),
                ),
                # Steps past the loaded one were undone: the run's curve continues from the checkpoint.
                ("DELETE FROM training_log WHERE run_id = ? AND step > ?", (run_id, step)),
                *self._completion(job_id, result_json),
            ]
        )

    def record_step(self, job_id: str, run_id: str, result: dict) -> None:
        """In one transaction: the run's step, its grad norm and learning rate in the training
        log, the job completed."""
        self._transaction(
            [
                ("UPDATE runs SET step = ? WHERE id = ?", (result["step"], run_id)),
                (
                    "INSERT OR REPLACE INTO training_log (job_id, run_id, step, kind, grad_norm, learning_rate, "
                    "recorded_at)"
                    " VALUES (?, ?, ?, 'optim_step', ?, ?, ?)",
                    (job_id, run_id, result["step"], result["grad_norm"], result["learning_rate"], time.time()),
                ),
                *self._completion(job_id, json.dumps(result)),
            ]
        )

    def record_forward_backward(
        self, job_id: str, run_id: str, result_json: str, loss: float, num_tokens: int, weight_sum: float | None = None
    ) -> None:
        """In one transaction: the batch's loss in the training log (at the step its gradient
        goes into), the job completed. `weight_sum`: cross_entropy's summed weights, which
        turn its weighted loss into a mean NLL per token (None for the RL losses)."""
        self._transaction(
            [
                (
                    "INSERT OR REPLACE INTO training_log"
                    " (job_id, run_id, step, kind, loss, num_tokens, weight_sum, recorded_at) SELECT ?, id, "
                    "step + 1, 'forward_backward', ?, ?, ?, ? FROM runs WHERE id = ?",
                    (job_id, loss, num_tokens, weight_sum, time.time(), run_id),
                ),
                *self._completion(job_id, result_json),
            ]
        )

    def training_log(self, run_id: str) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM training_log WHERE run_id = ? ORDER BY step, recorded_at", (run_id,))

    def last_losses(self, owner: str, run_id: str | None = None) -> dict[str, tuple[int, float, int]]:
        """Per run of the owner (or only `run_id`): (step, summed loss, its denominator) of its newest
        step with a forward_backward; the denominator is the weight sum where recorded, else the
        tokens that carried loss."""
        scope, args = _run_scope("t.run_id", owner, run_id)
        rows = self._query(
            "SELECT l.run_id, l.step, SUM(l.loss) AS loss, SUM(COALESCE(l.weight_sum, l.num_tokens)) AS tokens"
            " FROM training_log l"
            " JOIN (SELECT t.run_id, MAX(t.step) AS step FROM training_log t JOIN runs r ON r.id = t.run_id"
            f"       WHERE {scope} AND t.kind = 'forward_backward' GROUP BY t.run_id) newest"
            " ON newest.run_id = l.run_id AND newest.step = l.step"
            " WHERE l.kind = 'forward_backward' GROUP BY l.run_id, l.step",
            args,
        )
        return {r["run_id"]: (r["step"], r["loss"], r["tokens"]) for r in rows}

    def last_activity(self, owner: str, run_id: str | None = None) -> dict[str, float]:
        """Per run of the owner (or only `run_id`): when it last trained or saved (absent: never
        since its creation)."""
        log_scope, log_args = _run_scope("l.run_id", owner, run_id)
        saved_scope, saved_args = _run_scope("c.run_id", owner, run_id)
        rows = self._query(
            "SELECT run_id, MAX(t) AS t FROM ("
            f" SELECT l.run_id, l.recorded_at AS t FROM training_log l JOIN runs r ON r.id = l.run_id WHERE {log_scope}"
            " UNION ALL SELECT c.run_id, c.created_at FROM checkpoints c JOIN runs r ON r.id = c.run_id WHERE "
            f"{saved_scope}"
            ") GROUP BY run_id",
            (*log_args, *saved_args),
        )
        return {r["run_id"]: r["t"] for r in rows}

    @staticmethod
    def _completion(job_id: str, result_json: str) -> list[tuple[str, tuple]]:
        return [
            (
                "UPDATE jobs SET status = ?, result = ?, result_bytes = ?, error = NULL, finished_at = ? WHERE id = ?",
                (JobStatus.completed.value, result_json, len(result_json), time.time(), job_id),
            )
        ]

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        with self._writing() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    db.execute(sql, args)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def add_evaluation(self, evaluation_id: str, run_id: str, checkpoint: str | None, step: int, report: str) -> float:
        created = time.time()
        self._execute(
            "INSERT INTO evaluations (id, run_id, checkpoint, step, report, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (evaluation_id, run_id, checkpoint, step, report, created),
        )
        return created

    def evaluations(self, run_id: str) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM evaluations WHERE run_id = ? ORDER BY created_at, rowid", (run_id,))

    def delete_checkpoint(self, run_id: str, name: str) -> None:
        self._execute("DELETE FROM checkpoints WHERE run_id = ? AND name = ?", (run_id, name))

    def checkpoints_of(self, owner: str) -> list[CheckpointInfo]:
        """Every checkpoint of the owner's live runs but the server's own unnamed snapshots."""
        rows = self._query(
            "SELECT c.* FROM checkpoints c JOIN runs r ON r.id = c.run_id"
            " WHERE r.owner = ? AND r.deleted_at IS NULL AND c.auto = 0 ORDER BY c.created_at, c.rowid",
            (owner,),
        )
        return [_checkpoint_info(r) for r in rows]

    def set_checkpoint_step(self, run_id: str, name: str, step: int) -> None:
        self._execute("UPDATE checkpoints SET step = ? WHERE run_id = ? AND name = ?", (step, run_id, name))

    def checkpoints(self, run_id: str, include_auto: bool = True) -> list[CheckpointInfo]:
        """The run's checkpoints, oldest first; `include_auto` False leaves out the unnamed
        snapshots the server saved for sampling sessions (an implementation detail to listings)."""
        rows = self._query(
            "SELECT * FROM checkpoints WHERE run_id = ?"
            + ("" if include_auto else " AND auto = 0")
            + " ORDER BY created_at, rowid",
            (run_id,),
        )
        return [_checkpoint_info(r) for r in rows]

    def checkpoint(self, run_id: str, name: str) -> CheckpointInfo | None:
        rows = self._query("SELECT * FROM checkpoints WHERE run_id = ? AND name = ?", (run_id, name))
        return _checkpoint_info(rows[0]) if rows else None

    def checkpoint_meta(self, run_id: str, name: str) -> dict:
        rows = self._query("SELECT meta FROM checkpoints WHERE run_id = ? AND name = ?", (run_id, name))
        return json.loads(rows[0]["meta"]) if rows and rows[0]["meta"] else {}

    def auto_checkpoints(self, run_id: str) -> list[CheckpointInfo]:
        """The unnamed snapshots the server saved for the run's sampling sessions, oldest first."""
        rows = self._query(
            "SELECT * FROM checkpoints WHERE run_id = ? AND auto = 1 ORDER BY created_at, rowid", (run_id,)
        )
        return [_checkpoint_info(r) for r in rows]

    def runs_with_auto_checkpoints_over(self, count: int) -> list[str]:
        """Runs with more than `count` unnamed sampler snapshots."""
        rows = self._query(
            "SELECT run_id FROM checkpoints WHERE auto = 1 GROUP BY run_id HAVING COUNT(*) > ?", (count,)
        )
        return [r["run_id"] for r in rows]

    def set_checkpoint_expiry(self, run_id: str, name: str, expires_at: float | None) -> None:
        self._execute("UPDATE checkpoints SET expires_at = ? WHERE run_id = ? AND name = ?", (expires_at, run_id, name))

    def set_checkpoint_public(self, run_id: str, name: str, public: bool) -> None:
        self._execute("UPDATE checkpoints SET public = ? WHERE run_id = ? AND name = ?", (int(public), run_id, name))

    def checkpoints_to_remove(self, now: float) -> list[CheckpointInfo]:
        """Checkpoints past their expiry, and every checkpoint of a deleted run."""
        rows = self._query(
            "SELECT c.* FROM checkpoints c JOIN runs r ON r.id = c.run_id"
            " WHERE (c.expires_at IS NOT NULL AND c.expires_at <= ?) OR r.deleted_at IS NOT NULL",
            (now,),
        )
        return [_checkpoint_info(r) for r in rows]

    def runs_resuming_from(self, checkpoint_ref: str) -> list[sqlite3.Row]:
        """Live runs that a restart would rebuild from checkpoint '<run_id>/<name>' itself (not
        from a private snapshot of it)."""
        return self._query(
            "SELECT * FROM runs WHERE deleted_at IS NULL AND resume_from = ? AND resume_path IS NULL", (checkpoint_ref,)
        )

    def set_resume_path(self, run_id: str, snapshot: str) -> None:
        self._execute("UPDATE runs SET resume_path = ? WHERE id = ?", (snapshot, run_id))

    # ------------------------------------------------------------------------------ jobs
    def add_job(
        self,
        job_id: str,
        owner: str,
        run_id: str | None,
        kind: str,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> None:
        """Raises sqlite3.IntegrityError when the owner already used `idempotency_key` (its job
        may have expired since: the key is remembered on its own, idempotency_keys)."""
        added = self._execute(
            "INSERT INTO jobs (id, owner, run_id, kind, status, idempotency_key, request_hash, created_at)"
            " SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS"
            " (SELECT 1 FROM idempotency_keys WHERE owner = ? AND key = ?)",
            (
                job_id,
                owner,
                run_id,
                kind,
                JobStatus.pending.value,
                idempotency_key,
                request_hash,
                time.time(),
                owner,
                idempotency_key,
            ),
        )
        if not added:
            raise sqlite3.IntegrityError(f"idempotency key {idempotency_key!r} was used by an expired job")

    def create_job_of(self, run_id: str, owner: str) -> sqlite3.Row | None:
        """The newest create_run job of a run (None once finished jobs have expired)."""
        rows = self._query(
            "SELECT * FROM jobs WHERE run_id = ? AND kind = 'create_run' AND owner = ?"
            " ORDER BY created_at DESC LIMIT 1",
            (run_id, owner),
        )
        return rows[0] if rows else None

    def unfinished_jobs(self, owner: str, run_id: str | None = None) -> list[sqlite3.Row]:
        """The owner's pending and running jobs (of one run), oldest first."""
        sql = "SELECT * FROM jobs WHERE owner = ? AND status IN (?, ?)"
        args: tuple = (owner, JobStatus.pending.value, JobStatus.running.value)
        if run_id is not None:
            sql, args = sql + " AND run_id = ?", (*args, run_id)
        return self._query(sql + " ORDER BY created_at", args)

    def recent_jobs(self, owner: str, run_id: str, limit: int) -> list[sqlite3.Row]:
        """A run's newest jobs, finished or not (finished ones are kept until they expire)."""
        return self._query(
            "SELECT * FROM jobs WHERE owner = ? AND run_id = ? ORDER BY created_at DESC LIMIT ?", (owner, run_id, limit)
        )

    def job_by_key(self, owner: str, idempotency_key: str) -> sqlite3.Row | None:
        """The job the owner's key names (id, status, request_hash, error): its row, or once the
        row has expired, what idempotency_keys remembers of it."""
        rows = self._query(
            "SELECT id, status, request_hash, error FROM jobs WHERE owner = ? AND idempotency_key = ?"
            " UNION ALL SELECT job_id, status, request_hash, NULL FROM idempotency_keys WHERE owner = ? AND key = ?",
            (owner, idempotency_key, owner, idempotency_key),
        )
        return rows[0] if rows else None

    def job_row(self, job_id: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def mark_started(self, job_id: str) -> None:
        self._execute(
            "UPDATE jobs SET status = ?, started_at = ? WHERE id = ?",
            (JobStatus.running.value, time.time(), job_id),
        )

    def mark_finished(
        self, job_id: str, result: str | None = None, error: str | None = None, error_category: str = "server"
    ) -> None:
        """`result`: the job's result, already encoded as JSON (it is stored and served as is).
        `error_category`: 'user' (the request cannot succeed as sent) or 'server'."""
        status = JobStatus.failed if error is not None else JobStatus.completed
        result = None if error is not None else result
        self._execute(
            "UPDATE jobs SET status = ?, result = ?, result_bytes = ?, error = ?, error_category = ?, finished_at = ?"
            " WHERE id = ?",
            (
                status.value,
                result,
                None if result is None else len(result),
                error,
                None if error is None else error_category,
                time.time(),
                job_id,
            ),
        )

    def unfinished_creates(self) -> list[str]:
        """Runs whose create_run job was pending or running (at start-up: interrupted)."""
        rows = self._query(
            "SELECT run_id FROM jobs WHERE kind = 'create_run' AND status IN (?, ?) AND run_id IS NOT NULL",
            (JobStatus.pending.value, JobStatus.running.value),
        )
        return [row["run_id"] for row in rows]

    def release_idempotency_key(self, job_id: str) -> None:
        """Let the job's key be used again (its job was interrupted and had no effect)."""
        self._execute("UPDATE jobs SET idempotency_key = NULL, request_hash = NULL WHERE id = ?", (job_id,))

    def fail_unfinished_jobs(self) -> int:
        """After a restart: jobs that were pending or running can no longer complete."""
        return self._execute(
            "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE status IN (?, ?)",
            (JobStatus.failed.value, INTERRUPTED, time.time(), JobStatus.pending.value, JobStatus.running.value),
        )

    def expire(self, policy: RetentionPolicy) -> dict[str, int]:
        """Apply the retention policy (retention.py) once; returns what it removed, by kind."""
        with self._writing() as db:
            return expire(db, policy, forget_keys_of=INTERRUPTED)

    @staticmethod
    def job_record(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"],
            run_id=row["run_id"],
            kind=JobKind(row["kind"]),
            status=JobStatus(row["status"]),
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            result_json=row["result"],
            error=row["error"],
            error_category=row["error_category"] or ("server" if row["error"] else None),
        )


@dataclass(frozen=True)
class CheckpointLifecycle:
    """What a save records beside the checkpoint itself."""

    with_optimizer: bool = True  # False: weights only, which a restart does not restore from
    auto: bool = False  # an unnamed snapshot the server made (pruned by the server)
    ttl_seconds: float | None = None  # deleted this long after the save (None: kept)
    meta: dict = field(default_factory=dict)


def _checkpoint_info(row: sqlite3.Row) -> CheckpointInfo:
    return CheckpointInfo(
        run_id=row["run_id"],
        name=row["name"],
        path=row["path"],
        step=row["step"],
        created_at=_ts(row["created_at"]),
        expires_at=_ts(row["expires_at"]),
        public=bool(row["public"]),
    )


@dataclass(frozen=True)
class JobRecord:
    """A job as stored: its result is the JSON text the worker wrote, decoded only on demand."""

    id: str
    run_id: str | None
    kind: JobKind
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    result_json: str | None
    error: str | None
    error_category: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.completed, JobStatus.failed)

    def result(self) -> Any:
        return None if self.result_json is None else json.loads(self.result_json)

    def info(self, with_result: bool = True) -> JobInfo:
        """The REST API's view of the job (its result decoded, unless `with_result` is False)."""
        return JobInfo(
            id=self.id,
            run_id=self.run_id,
            kind=self.kind,
            status=self.status,
            created_at=_ts(self.created_at),
            started_at=_ts(self.started_at),
            finished_at=_ts(self.finished_at),
            result=self.result() if with_result else None,
            error=self.error,
        )


class SessionStore:
    """Tinker client sessions and sampling sessions, in the same database."""

    def __init__(self, store: Store):
        self._store = store

    def add_session(self, session_id: str, owner: str, metadata: dict) -> None:
        now = time.time()
        self._store._execute(
            "INSERT INTO sessions (id, owner, metadata, created_at, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
            (session_id, owner, json.dumps(metadata), now, now),
        )

    def session(self, session_id: str, owner: str) -> sqlite3.Row | None:
        rows = self._store._query("SELECT * FROM sessions WHERE id = ? AND owner = ?", (session_id, owner))
        return rows[0] if rows else None

    def sessions(self, owner: str) -> list[sqlite3.Row]:
        return self._store._query("SELECT * FROM sessions WHERE owner = ? ORDER BY created_at", (owner,))

    def heartbeat(self, session_id: str) -> None:
        self._store._execute("UPDATE sessions SET heartbeat_at = ? WHERE id = ?", (time.time(), session_id))

    def finish(self, session_id: str) -> None:
        self._store._execute(
            "UPDATE sessions SET finished_at = ? WHERE id = ? AND finished_at IS NULL", (time.time(), session_id)
        )

    def add_sampler(
        self, sampler_id: str, owner: str, base_model: str, checkpoint: str | None, model_path: str | None
    ) -> None:
        self._store._execute(
            "INSERT OR REPLACE INTO samplers (id, owner, base_model, checkpoint, model_path, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (sampler_id, owner, base_model, checkpoint, model_path, time.time()),
        )

    def sampler(self, sampler_id: str, owner: str) -> sqlite3.Row | None:
        rows = self._store._query("SELECT * FROM samplers WHERE id = ? AND owner = ?", (sampler_id, owner))
        return rows[0] if rows else None

    def samplers_of_session(self, session_id: str) -> list[str]:
        # instr, not LIKE: session ids hold '_', which LIKE takes for any character.
        rows = self._store._query("SELECT id FROM samplers WHERE instr(id, ?) = 1", (f"{session_id}:sample:",))
        return [r["id"] for r in rows]


def _run_scope(column: str, owner: str, run_id: str | None) -> tuple[str, tuple]:
    """The WHERE condition (on a query joining `runs r`) for the owner's runs, or one of them:
    one run's lookups use the run's index instead of reading all of the owner's history."""
    if run_id is None:
        return "r.owner = ?", (owner,)
    return f"r.owner = ? AND {column} = ?", (owner, run_id)
