"""The jobs table: every request's job, its status and result, and the Idempotency-Keys that name them."""

from __future__ import annotations

import sqlite3
import time

from ...backend.results import JobKind
from ...types import JobStatus
from ..records import INTERRUPTED, JobRecord, KeyedJob
from ..retention import RetentionPolicy, expire
from .database import Database, Statement


def job_record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        owner=row["owner"],
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


def completion(job_id: str, result_json: str) -> list[Statement]:
    """The statement that completes a job with its result, for a transaction that records its effect."""
    return [
        (
            "UPDATE jobs SET status = ?, result = ?, result_bytes = ?, error = NULL, finished_at = ? WHERE id = ?",
            (JobStatus.completed.value, result_json, len(result_json), time.time(), job_id),
        )
    ]


class JobTable(Database):
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
        added = self.execute(
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

    def job(self, job_id: str) -> JobRecord | None:
        rows = self.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return job_record(rows[0]) if rows else None

    def create_job_of(self, run_id: str, owner: str) -> JobRecord | None:
        """The newest create_run job of a run (None once finished jobs have expired)."""
        rows = self.query(
            "SELECT * FROM jobs WHERE run_id = ? AND kind = 'create_run' AND owner = ?"
            " ORDER BY created_at DESC LIMIT 1",
            (run_id, owner),
        )
        return job_record(rows[0]) if rows else None

    def unfinished_jobs(self, owner: str, run_id: str | None = None) -> list[JobRecord]:
        """The owner's pending and running jobs (of one run), oldest first."""
        sql = "SELECT * FROM jobs WHERE owner = ? AND status IN (?, ?)"
        args: tuple = (owner, JobStatus.pending.value, JobStatus.running.value)
        if run_id is not None:
            sql, args = sql + " AND run_id = ?", (*args, run_id)
        return [job_record(row) for row in self.query(sql + " ORDER BY created_at", args)]

    def recent_jobs(self, owner: str, run_id: str, limit: int) -> list[JobRecord]:
        """A run's newest jobs, finished or not (finished ones are kept until they expire)."""
        rows = self.query(
            "SELECT * FROM jobs WHERE owner = ? AND run_id = ? ORDER BY created_at DESC LIMIT ?", (owner, run_id, limit)
        )
        return [job_record(row) for row in rows]

    def job_by_key(self, owner: str, idempotency_key: str) -> KeyedJob | None:
        """The job the owner's key names: from its row, or once the row has expired, from what
        idempotency_keys remembers of it."""
        rows = self.query(
            "SELECT id, status, request_hash, error FROM jobs WHERE owner = ? AND idempotency_key = ?"
            " UNION ALL SELECT job_id, status, request_hash, NULL FROM idempotency_keys WHERE owner = ? AND key = ?",
            (owner, idempotency_key, owner, idempotency_key),
        )
        if not rows:
            return None
        job_id, status, request_hash, error = rows[0]
        return KeyedJob(job_id=job_id, status=JobStatus(status), request_hash=request_hash, error=error)

    def mark_started(self, job_id: str) -> None:
        self.execute(
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
        self.execute(
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
        rows = self.query(
            "SELECT run_id FROM jobs WHERE kind = 'create_run' AND status IN (?, ?) AND run_id IS NOT NULL",
            (JobStatus.pending.value, JobStatus.running.value),
        )
        return [row["run_id"] for row in rows]

    def release_idempotency_key(self, job_id: str) -> None:
        """Let the job's key be used again (its job was interrupted and had no effect)."""
        self.execute("UPDATE jobs SET idempotency_key = NULL, request_hash = NULL WHERE id = ?", (job_id,))

    def fail_unfinished_jobs(self) -> int:
        """After a restart: jobs that were pending or running can no longer complete."""
        return self.execute(
            "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE status IN (?, ?)",
            (JobStatus.failed.value, INTERRUPTED, time.time(), JobStatus.pending.value, JobStatus.running.value),
        )

    def expire(self, policy: RetentionPolicy) -> dict[str, int]:
        """Apply the retention policy (retention.py) once; returns what it removed, by kind."""
        with self.writing() as db:
            return expire(db, policy, forget_keys_of=INTERRUPTED)
