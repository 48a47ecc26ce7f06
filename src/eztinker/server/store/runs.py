"""The runs table: who owns a run, its base model and LoRA, its step, and what a restart rebuilds it from."""

from __future__ import annotations

import json
import sqlite3
import time

from ...types import LoraConfig
from ..records import RunRecord
from .database import Database, json_object


def run_record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"],
        owner=row["owner"],
        base_model=row["base_model"],
        lora=LoraConfig.model_validate_json(row["lora"]),
        seed=row["seed"],
        step=row["step"],
        created_at=row["created_at"],
        restored_from=row["restored_from"],
        resume_from=row["resume_from"],
        resume_path=row["resume_path"],
        deleted_at=row["deleted_at"],
        metadata=json_object(row["metadata"]),
    )


class RunTable(Database):
    def add_run(
        self, run_id: str, owner: str, base_model: str, lora: LoraConfig, seed: int, metadata: dict | None = None
    ) -> None:
        self.execute(
            "INSERT INTO runs (id, owner, base_model, lora, seed, created_at, metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_id, owner, base_model, lora.model_dump_json(), seed, time.time(), json.dumps(metadata or {})),
        )

    def run(self, run_id: str) -> RunRecord | None:
        """A live run (None once deleted)."""
        rows = self.query("SELECT * FROM runs WHERE id = ? AND deleted_at IS NULL", (run_id,))
        return run_record(rows[0]) if rows else None

    def run_any(self, run_id: str) -> RunRecord | None:
        """A run, deleted or not (its checkpoints outlive it)."""
        rows = self.query("SELECT * FROM runs WHERE id = ?", (run_id,))
        return run_record(rows[0]) if rows else None

    def live_runs(self, owner: str | None = None) -> list[RunRecord]:
        """Every live run (of `owner`), oldest first."""
        if owner is None:
            rows = self.query("SELECT * FROM runs WHERE deleted_at IS NULL ORDER BY created_at")
        else:
            rows = self.query("SELECT * FROM runs WHERE deleted_at IS NULL AND owner = ? ORDER BY created_at", (owner,))
        return [run_record(row) for row in rows]

    def run_owner(self, run_id: str) -> str | None:
        """Owner of a run, deleted or not (its checkpoints outlive it)."""
        rows = self.query("SELECT owner FROM runs WHERE id = ?", (run_id,))
        return rows[0]["owner"] if rows else None

    def record_restore(self, run_id: str, step: int, restored_from: str | None) -> None:
        """In one transaction: a run rebuilt after a crash (or its worker's loss) at `step`, and its
        curve cut back to that step: what was logged after it belongs to the life the crash ended,
        and its re-run must not count twice."""
        self.transaction(
            [
                ("UPDATE runs SET step = ?, restored_from = ? WHERE id = ?", (step, restored_from, run_id)),
                ("DELETE FROM training_log WHERE run_id = ? AND step > ?", (run_id, step)),
            ]
        )

    def runs_resuming_from(self, checkpoint_ref: str) -> list[RunRecord]:
        """Live runs that a restart would rebuild from checkpoint '<run_id>/<name>' itself (not
        from a private snapshot of it)."""
        rows = self.query(
            "SELECT * FROM runs WHERE deleted_at IS NULL AND resume_from = ? AND resume_path IS NULL", (checkpoint_ref,)
        )
        return [run_record(row) for row in rows]

    def set_resume_path(self, run_id: str, snapshot: str) -> None:
        self.execute("UPDATE runs SET resume_path = ? WHERE id = ?", (snapshot, run_id))

    def mark_run_deleted(self, run_id: str) -> None:
        self.execute("UPDATE runs SET deleted_at = ? WHERE id = ?", (time.time(), run_id))
