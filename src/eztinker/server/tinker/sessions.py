"""`TinkerServing`'s client sessions: created, kept alive by heartbeats, finished; and what the
server offers (its models and losses)."""

from __future__ import annotations

import uuid

from ...types import LOSS_FNS
from ..service import ServiceError
from . import protocol as p
from .core import TinkerCore


class SessionsPart(TinkerCore):
    """Client sessions: created, kept alive by heartbeats, finished; and the server's capabilities."""

    def client_config(self) -> dict:
        """The flags every SDK reads first. Each sample in flight holds a connection polling for its
        result, and the SDK's own limit is 2,000 a sampling client: the cookbook's math_rl (400
        samples a step) met the server's connection cap (`max_connections`) with thousands of 503s
        and retries. A sampling client may keep a quarter of the cap in flight; the server decodes
        those together while the SDK holds back the rest."""
        in_flight = max(1, self.service.settings.max_connections // 4)
        return {**p.CLIENT_CONFIG, "sample_max_concurrent_requests": in_flight}

    def capabilities(self) -> dict:
        # The SDK's GetServerCapabilitiesResponse has no field for losses (it ignores the extra
        # key); supported_loss_fns is for clients that read the JSON themselves.
        return {
            "supported_models": [
                {
                    "model_name": m.name,
                    "max_context_length": m.max_context_length,
                    "trainable": True,
                    "sampleable": True,
                }
                for m in self.service.models.values()
            ],
            "supported_loss_fns": list(LOSS_FNS),
        }

    def create_session(self, user: str, body: p.CreateSession) -> str:
        session_id = f"sess_{uuid.uuid4().hex[:16]}"
        self.service.add_session(
            user, session_id, {"tags": body.tags, "user_metadata": body.user_metadata, "sdk_version": body.sdk_version}
        )
        self.liveness.beat(session_id)
        return session_id

    def heartbeat(self, user: str, session_id: str) -> None:
        self.session_of(user, session_id)
        self.service.heartbeat(session_id)
        self.liveness.beat(session_id)

    def finish_session(self, user: str, session_id: str) -> None:
        if self.service.session(user, session_id) is None:
            raise ServiceError(404, f"session {session_id} not found")
        self.service.finish_session(session_id)
        self.liveness.finish(session_id)  # its samples still decoding stop at their next step

    def session_ids(self, user: str) -> list[str]:
        return [session.id for session in self.service.sessions(user)]

    def session_contents(self, user: str, session_id: str) -> dict:
        if self.service.session(user, session_id) is None:
            raise ServiceError(404, f"session {session_id} not found")
        runs = [r.id for r in self.service.list_runs(user) if r.id.startswith(f"{session_id}:train:")]
        return {"training_run_ids": runs, "sampler_ids": self.service.samplers_of_session(session_id)}
