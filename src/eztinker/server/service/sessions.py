"""Tinker's client sessions and sampling sessions, as the Tinker router needs them recorded."""

from __future__ import annotations

from ..records import SamplerRecord, SessionRecord
from .core import ServiceCore


class SessionsPart(ServiceCore):
    def add_session(self, user: str, session_id: str, metadata: dict) -> None:
        self.store.add_session(session_id, user, metadata)

    def session(self, user: str, session_id: str) -> SessionRecord | None:
        """One of the user's sessions, ended or not (None: not theirs, or none)."""
        return self.store.session(session_id, user)

    def sessions(self, user: str) -> list[SessionRecord]:
        """The user's sessions, oldest first."""
        return self.store.sessions(user)

    def heartbeat(self, session_id: str) -> None:
        self.store.heartbeat(session_id)

    def finish_session(self, session_id: str) -> None:
        self.store.finish_session(session_id)

    def add_sampler(
        self, user: str, sampler_id: str, base_model: str, checkpoint: str | None, model_path: str | None
    ) -> None:
        """Record a sampling session: of `base_model` bare, or of `checkpoint` ('<run_id>/<name>')."""
        self.store.add_sampler(sampler_id, user, base_model, checkpoint, model_path)

    def sampler(self, user: str, sampler_id: str) -> SamplerRecord | None:
        return self.store.sampler(sampler_id, user)

    def samplers_of_session(self, session_id: str) -> list[str]:
        return self.store.samplers_of_session(session_id)
