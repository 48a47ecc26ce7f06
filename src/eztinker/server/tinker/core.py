"""What the parts of `TinkerServing` share: the protocol's state (the per-model training order,
the futures' extras, the sessions' liveness, the sequences recorded for stable_reinforce) and
the refusals every part makes the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ...backend.results import JobKind
from ..service import Service, ServiceError
from . import wire
from .futures import FutureExtras, FutureRef
from .provenance import StabilityRecords

log = logging.getLogger(__name__)

TURN_SECONDS = 30.0  # a training request arriving before its predecessor waits this long for it
# The modules a LoRA's train_attn and train_mlp name.
ATTN_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]


class Sequencer:
    """Runs each model's training requests in `seq_id` order: a request waits (up to
    TURN_SECONDS) until every lower seq_id of its model has been submitted. The SDK sends the
    chunks of one call concurrently, so they can arrive out of order."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self._changed = asyncio.Condition()

    def start(self, model_id: str, first: int = 1) -> None:
        self._next[model_id] = first

    @asynccontextmanager
    async def turn(self, model_id: str, seq_id: int | None) -> AsyncIterator[None]:
        if seq_id is None:
            yield
            return
        async with self._changed:
            self._next.setdefault(model_id, seq_id)  # a model this process did not start (e.g. after a restart)
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._next[model_id] >= seq_id), TURN_SECONDS)
            except asyncio.TimeoutError:
                log.warning(
                    "model %s: seq_id %d went ahead after waiting %.0f s for seq_id %d",
                    model_id,
                    seq_id,
                    TURN_SECONDS,
                    self._next[model_id],
                )
        try:
            yield
        finally:
            async with self._changed:
                self._next[model_id] = max(self._next.get(model_id, 0), seq_id + 1)
                self._changed.notify_all()


class SessionLiveness:
    """When each client session last showed life, in memory (seeded from the database after a
    restart): a sample of the session asks after every decode step, for the price of a dict
    look-up, whether its session has ended (finished, or no heartbeat for the timeout)."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self._beats: dict[str, float] = {}
        self._finished: set[str] = set()

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._beats

    def beat(self, session_id: str, at: float | None = None) -> None:
        self._beats[session_id] = max(time.time() if at is None else at, self._beats.get(session_id, 0.0))

    def finish(self, session_id: str) -> None:
        self._finished.add(session_id)

    def ended(self, session_id: str) -> bool:
        return session_id in self._finished or time.time() - self._beats.get(session_id, 0.0) > self.timeout_seconds


def model_id_of(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


class TinkerCore:
    """The state the parts (sessions.py, training.py, weights.py, sampling.py, answers.py, runs.py)
    share; `TinkerServing` (serving.py) builds it."""

    service: Service
    sequencer: Sequencer
    extras: FutureExtras
    stability: StabilityRecords  # sequences sampled with record_stability_info
    liveness: SessionLiveness

    def _not_owned(self, user: str, kind: JobKind, model_id: str) -> FutureRef | None:
        """A failed future when `model_id` is not one of the user's models, checked before its
        turn: another user's request never waits in, nor moves, that model's sequence."""
        try:
            self.service.owned_run(user, model_id)
        except ServiceError as exc:
            return self._refused(user, kind, None, exc)
        return None

    def _refused(self, user: str, kind: JobKind, run_id: str | None, exc: Exception) -> FutureRef:
        # A per-user limit (a 429) on a training call is a failed future too, even one that waiting
        # would clear: the SDK would retry it after the calls behind it had taken its seq_id turn.
        message = exc.message if isinstance(exc, (ServiceError, wire.WireError)) else str(exc)
        if isinstance(exc, ServiceError) and exc.loc:
            message = f"{'.'.join(str(part) for part in exc.loc)}: {message}"
        return FutureRef(self.service.failed_job(user, kind, run_id, message).job_id)

    def session_of(self, user: str, session_id: str):
        session = self.service.session(user, session_id)
        if session is None:
            raise ServiceError(404, f"session {session_id} not found")
        timeout = self.service.settings.tinker_session_timeout_seconds
        if session.finished_at is not None or time.time() - session.heartbeat_at > timeout:
            raise ServiceError(410, f"session {session_id} has ended; create a new ServiceClient")
        return session
