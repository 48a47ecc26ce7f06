"""The checkpoints table: each saved adapter's directory, step, expiry, visibility and protocol metadata."""

from __future__ import annotations

import json
import sqlite3
import time

from ..records import CheckpointLifecycle, CheckpointRecord
from .database import Database, json_object, run_scope
from .jobs import completion


def checkpoint_record(row: sqlite3.Row) -> CheckpointRecord:
    return CheckpointRecord(
        run_id=row["run_id"],
        name=row["name"],
        path=row["path"],
        step=row["step"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        public=bool(row["public"]),
        auto=bool(row["auto"]),
        meta=json_object(row["meta"]),
    )


class CheckpointTable(Database):
    def record_save(
        self, job_id: str, run_id: str, name: str, path: str, step: int, lifecycle: CheckpointLifecycle | None = None
    ) -> CheckpointRecord:
        """In one transaction: the checkpoint's row, the run's resume point (a save with the
        optimizer state only: a restart restores exactly what was saved), the job completed."""
        now, life = time.time(), lifecycle or CheckpointLifecycle()
        expires_at = None if life.ttl_seconds is None else now + life.ttl_seconds
        record = CheckpointRecord(
            run_id=run_id, name=name, path=path, step=step, created_at=now, expires_at=expires_at, auto=life.auto
        )
        resume = [("UPDATE runs SET resume_from = ?, resume_path = NULL WHERE id = ?", (record.ref, run_id))]
        self.transaction(
            [
                (
                    "INSERT OR REPLACE INTO checkpoints (run_id, name, path, step, created_at, auto, "
                    "expires_at, public, meta)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                    (run_id, name, path, step, now, int(life.auto), expires_at, json.dumps(life.meta)),
                ),
                *(resume if life.with_optimizer else []),
                *completion(job_id, record.info().model_dump_json()),
            ]
        )
        return record

    def record_load(
        self, job_id: str, run_id: str, step: int, checkpoint_ref: str, result_json: str, snapshot: str
    ) -> None:
        """In one transaction: the run's step and resume point (`snapshot`, the data-dir-relative
        copy of `checkpoint_ref` it loaded), the job completed."""
        self.transaction(
            [
                (
                    "UPDATE runs SET step = ?, restored_from = ?, resume_from = ?, resume_path = ? WHERE id = ?",
                    (step, checkpoint_ref, checkpoint_ref, snapshot, run_id),
                ),
                # Steps past the loaded one were undone: the run's curve continues from the checkpoint.
                ("DELETE FROM training_log WHERE run_id = ? AND step > ?", (run_id, step)),
                *completion(job_id, result_json),
            ]
        )

    def checkpoint(self, run_id: str, name: str) -> CheckpointRecord | None:
        rows = self.query("SELECT * FROM checkpoints WHERE run_id = ? AND name = ?", (run_id, name))
        return checkpoint_record(rows[0]) if rows else None

    def checkpoints(self, run_id: str, include_auto: bool = True) -> list[CheckpointRecord]:
        """The run's checkpoints, oldest first; `include_auto` False leaves out the unnamed
        snapshots the server saved for sampling sessions (an implementation detail to listings)."""
        rows = self.query(
            "SELECT * FROM checkpoints WHERE run_id = ?"
            + ("" if include_auto else " AND auto = 0")
            + " ORDER BY created_at, rowid",
            (run_id,),
        )
        return [checkpoint_record(r) for r in rows]

    def checkpoints_of(self, owner: str, run_id: str | None = None) -> list[CheckpointRecord]:
        """Every checkpoint of the owner's live runs (or of one of them) but the server's own
        unnamed snapshots, oldest first: one query however many runs."""
        scope, args = run_scope("c.run_id", owner, run_id)
        rows = self.query(
            "SELECT c.* FROM checkpoints c JOIN runs r ON r.id = c.run_id"
            f" WHERE {scope} AND r.deleted_at IS NULL AND c.auto = 0 ORDER BY c.created_at, c.rowid",
            args,
        )
        return [checkpoint_record(r) for r in rows]

    def auto_checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        """The unnamed snapshots the server saved for the run's sampling sessions, oldest first."""
        rows = self.query(
            "SELECT * FROM checkpoints WHERE run_id = ? AND auto = 1 ORDER BY created_at, rowid", (run_id,)
        )
        return [checkpoint_record(r) for r in rows]

    def runs_with_auto_checkpoints_over(self, count: int) -> list[str]:
        """Runs with more than `count` unnamed sampler snapshots."""
        rows = self.query("SELECT run_id FROM checkpoints WHERE auto = 1 GROUP BY run_id HAVING COUNT(*) > ?", (count,))
        return [r["run_id"] for r in rows]

    def checkpoints_to_remove(self, now: float) -> list[CheckpointRecord]:
        """Checkpoints past their expiry, and every checkpoint of a deleted run."""
        rows = self.query(
            "SELECT c.* FROM checkpoints c JOIN runs r ON r.id = c.run_id"
            " WHERE (c.expires_at IS NOT NULL AND c.expires_at <= ?) OR r.deleted_at IS NOT NULL",
            (now,),
        )
        return [checkpoint_record(r) for r in rows]

    def set_checkpoint_step(self, run_id: str, name: str, step: int) -> None:
        self.execute("UPDATE checkpoints SET step = ? WHERE run_id = ? AND name = ?", (step, run_id, name))

    def set_checkpoint_expiry(self, run_id: str, name: str, expires_at: float | None) -> None:
        self.execute("UPDATE checkpoints SET expires_at = ? WHERE run_id = ? AND name = ?", (expires_at, run_id, name))

    def set_checkpoint_public(self, run_id: str, name: str, public: bool) -> None:
        self.execute("UPDATE checkpoints SET public = ? WHERE run_id = ? AND name = ?", (int(public), run_id, name))

    def delete_checkpoint(self, run_id: str, name: str) -> None:
        self.execute("DELETE FROM checkpoints WHERE run_id = ? AND name = ?", (run_id, name))
