"""Tinker client sessions and sampling sessions."""

from __future__ import annotations

import json
import sqlite3
import time

from ..records import SamplerRecord, SessionRecord
from .database import Database, json_object


def _session(row: sqlite3.Row) -> SessionRecord:
    return SessionRecord(
        id=row["id"],
        owner=row["owner"],
        metadata=json_object(row["metadata"]),
        created_at=row["created_at"],
        heartbeat_at=row["heartbeat_at"],
        finished_at=row["finished_at"],
    )


def _sampler(row: sqlite3.Row) -> SamplerRecord:
    return SamplerRecord(
        id=row["id"],
        owner=row["owner"],
        base_model=row["base_model"],
        checkpoint=row["checkpoint"],
        model_path=row["model_path"],
        created_at=row["created_at"],
    )


class SessionTable(Database):
    def add_session(self, session_id: str, owner: str, metadata: dict) -> None:
        now = time.time()
        self.execute(
            "INSERT INTO sessions (id, owner, metadata, created_at, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
            (session_id, owner, json.dumps(metadata), now, now),
        )

    def session(self, session_id: str, owner: str) -> SessionRecord | None:
        rows = self.query("SELECT * FROM sessions WHERE id = ? AND owner = ?", (session_id, owner))
        return _session(rows[0]) if rows else None

    def sessions(self, owner: str) -> list[SessionRecord]:
        rows = self.query("SELECT * FROM sessions WHERE owner = ? ORDER BY created_at", (owner,))
        return [_session(row) for row in rows]

    def heartbeat(self, session_id: str) -> None:
        self.execute("UPDATE sessions SET heartbeat_at = ? WHERE id = ?", (time.time(), session_id))

    def finish_session(self, session_id: str) -> None:
        self.execute(
            "UPDATE sessions SET finished_at = ? WHERE id = ? AND finished_at IS NULL", (time.time(), session_id)
        )

    def add_sampler(
        self, sampler_id: str, owner: str, base_model: str, checkpoint: str | None, model_path: str | None
    ) -> None:
        self.execute(
            "INSERT OR REPLACE INTO samplers (id, owner, base_model, checkpoint, model_path, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (sampler_id, owner, base_model, checkpoint, model_path, time.time()),
        )

    def sampler(self, sampler_id: str, owner: str) -> SamplerRecord | None:
        rows = self.query("SELECT * FROM samplers WHERE id = ? AND owner = ?", (sampler_id, owner))
        return _sampler(rows[0]) if rows else None

    def samplers_of_session(self, session_id: str) -> list[str]:
        # instr, not LIKE: session ids hold '_', which LIKE takes for any character.
        rows = self.query("SELECT id FROM samplers WHERE instr(id, ?) = 1", (f"{session_id}:sample:",))
        return [r["id"] for r in rows]
