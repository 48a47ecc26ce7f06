"""What the store keeps of finished jobs, for how long, per user.

Everything here is per user and by time, so one user's traffic never shortens what another's
retries can rely on (a global count once let user B's refused calls evict user A's finished
optim_step, and A's retry with the same Idempotency-Key applied it twice):

- a finished job (status, error, result) is kept `job_ttl_s`, and each user keeps at most the
  newest `max_jobs_per_user` (their own traffic evicts only their own jobs);
- a result larger than `large_result_bytes` is dropped `large_result_ttl_s` after its job
  finished, or sooner once the user's large results exceed `max_result_bytes_per_user` (oldest
  first); the job stays, `completed`, its error saying that its result is gone;
- an Idempotency-Key is remembered `idempotency_ttl_s`, whatever happened to its job's row: an
  expired job leaves its key, job id, request hash and status in `idempotency_keys`, so a retry
  is answered with the original job instead of running again. At most
  `max_idempotency_keys_per_user` remembered keys per user (about 150 bytes each).

The worker applies it after a job, at most once a minute (runner.py).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetentionPolicy:
    job_ttl_s: float
    max_jobs_per_user: int
    idempotency_ttl_s: float
    max_idempotency_keys_per_user: int
    large_result_bytes: int
    large_result_ttl_s: float
    max_result_bytes_per_user: int


def dropped_result_message(size: int, policy: RetentionPolicy, reason: str) -> str:
    return (
        f"the job completed, but its result ({size / 1e6:.1f} MB) is no longer kept: {reason}. "
        f"Results over {policy.large_result_bytes} bytes are kept {policy.large_result_ttl_s:g} s "
        f"(large_result_ttl_seconds), and {policy.max_result_bytes_per_user} bytes of them per user "
        "(max_result_bytes_per_user)"
    )


def expire(
    db: sqlite3.Connection, policy: RetentionPolicy, *, forget_keys_of: str, now: float | None = None
) -> dict[str, int]:
    """One pass of the policy over the database (the caller holds its connection). A job whose
    error is `forget_keys_of` (interrupted: it had no effect) leaves no key behind."""
    now = time.time() if now is None else now
    removed = {"jobs": 0, "results": 0, "keys": 0}
    db.execute("BEGIN IMMEDIATE")
    try:
        # Finished jobs past their time, then each user's beyond their newest max_jobs_per_user.
        removed["jobs"] += _remove_jobs(
            db, "finished_at IS NOT NULL AND finished_at < ?", (now - policy.job_ttl_s,), now, policy, forget_keys_of
        )
        for (owner,) in db.execute(
            "SELECT owner FROM jobs WHERE finished_at IS NOT NULL GROUP BY owner HAVING COUNT(*) > ?",
            (policy.max_jobs_per_user,),
        ).fetchall():
            removed["jobs"] += _remove_jobs(
                db,
                "owner = ? AND finished_at IS NOT NULL AND id NOT IN (SELECT id FROM jobs WHERE owner = ?"
                " AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?)",
                (owner, owner, policy.max_jobs_per_user),
                now,
                policy,
                forget_keys_of,
            )
        # Large results past their time, then each user's beyond max_result_bytes_per_user (newest kept).
        old = db.execute(
            "SELECT id, result_bytes FROM jobs WHERE result_bytes > ? AND finished_at < ?",
            (policy.large_result_bytes, now - policy.large_result_ttl_s),
        ).fetchall()
        removed["results"] += _drop_results(db, old, policy, f"it finished over {policy.large_result_ttl_s:g} s ago")
        for (owner,) in db.execute(
            "SELECT owner FROM jobs WHERE result_bytes > ? GROUP BY owner HAVING SUM(result_bytes) > ?",
            (policy.large_result_bytes, policy.max_result_bytes_per_user),
        ).fetchall():
            over = db.execute(
                "SELECT id, result_bytes FROM (SELECT id, result_bytes, SUM(result_bytes) OVER"
                " (ORDER BY finished_at DESC, id) AS newer FROM jobs WHERE owner = ? AND result_bytes > ?)"
                " WHERE newer > ?",
                (owner, policy.large_result_bytes, policy.max_result_bytes_per_user),
            ).fetchall()
            removed["results"] += _drop_results(db, over, policy, "its owner's newer large results fill their share")
        # Remembered keys past their time, then each user's beyond their newest max_idempotency_keys_per_user.
        removed["keys"] += db.execute(
            "DELETE FROM idempotency_keys WHERE finished_at < ?", (now - policy.idempotency_ttl_s,)
        ).rowcount
        for (owner,) in db.execute(
            "SELECT owner FROM idempotency_keys GROUP BY owner HAVING COUNT(*) > ?",
            (policy.max_idempotency_keys_per_user,),
        ).fetchall():
            removed["keys"] += db.execute(
                "DELETE FROM idempotency_keys WHERE owner = ? AND key NOT IN (SELECT key FROM idempotency_keys"
                " WHERE owner = ? ORDER BY finished_at DESC LIMIT ?)",
                (owner, owner, policy.max_idempotency_keys_per_user),
            ).rowcount
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return removed


def _remove_jobs(
    db: sqlite3.Connection, where: str, args: tuple, now: float, policy: RetentionPolicy, forget_keys_of: str
) -> int:
    """Delete the jobs `where` selects; those whose key is still within idempotency_ttl leave it
    in idempotency_keys."""
    db.execute(
        "INSERT OR IGNORE INTO idempotency_keys (owner, key, job_id, request_hash, status, finished_at)"
        f" SELECT owner, idempotency_key, id, request_hash, status, finished_at FROM jobs WHERE {where}"
        " AND idempotency_key IS NOT NULL AND finished_at >= ? AND (error IS NULL OR error != ?)",
        (*args, now - policy.idempotency_ttl_s, forget_keys_of),
    )
    return db.execute(f"DELETE FROM jobs WHERE {where}", args).rowcount


def _drop_results(db: sqlite3.Connection, rows: list, policy: RetentionPolicy, reason: str) -> int:
    for job_id, size in rows:
        db.execute(
            "UPDATE jobs SET result = NULL, result_bytes = NULL, error = ?, error_category = 'user' WHERE id = ?",
            (dropped_result_message(size, policy, reason), job_id),
        )
    return len(rows)
