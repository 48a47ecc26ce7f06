"""What the store hands out: frozen records, never the database driver's rows.

Routers and the service read these fields; nothing outside `server/store/` knows the records come
from SQLite (or which columns they were read from).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..backend.results import JobKind
from ..types import CheckpointInfo, JobInfo, JobStatus, LoraConfig

# The error of a job the server stopped before it finished (a restart): the job had no effect.
INTERRUPTED = "interrupted: the server stopped before this job finished; its effect was not applied"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def utc(value: float) -> datetime:
    """A stored Unix time as an aware UTC datetime."""
    return datetime.fromtimestamp(value, tz=timezone.utc)


def utc_or_none(value: float | None) -> datetime | None:
    return None if value is None else utc(value)


@dataclass(frozen=True)
class RunRecord:
    """A run as stored. `resume_from`: the checkpoint ('<run_id>/<name>') its live state was last
    saved to or loaded from; `resume_path`: after a load, the private snapshot of it to restore from."""

    id: str
    owner: str
    base_model: str
    lora: LoraConfig
    seed: int
    step: int
    created_at: float
    restored_from: str | None = None
    resume_from: str | None = None
    resume_path: str | None = None
    deleted_at: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # the protocol's own (Tinker's user_metadata...)

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint as stored. `path`: its directory, relative to the data directory when inside it;
    `auto`: an unnamed snapshot the server saved for a sampling session (the server prunes those);
    `meta`: the protocol's own (user metadata, age recipients...)."""

    run_id: str
    name: str
    path: str
    step: int
    created_at: float
    expires_at: float | None = None
    public: bool = False
    auto: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.run_id}/{self.name}"

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def info(self) -> CheckpointInfo:
        """The REST API's view of it."""
        return CheckpointInfo(
            run_id=self.run_id,
            name=self.name,
            path=self.path,
            step=self.step,
            created_at=utc(self.created_at),
            expires_at=utc_or_none(self.expires_at),
            public=self.public,
        )


@dataclass(frozen=True)
class CheckpointLifecycle:
    """What a save records beside the checkpoint itself."""

    with_optimizer: bool = True  # False: weights only, which a restart does not restore from
    auto: bool = False  # an unnamed snapshot the server made (pruned by the server)
    ttl_seconds: float | None = None  # deleted this long after the save (None: kept)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobRecord:
    """A job as stored: its result is the JSON text the worker wrote, decoded only on demand."""

    id: str
    owner: str
    run_id: str | None
    kind: JobKind
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    result_json: str | None
    error: str | None
    error_category: str | None = None  # 'user' (the request cannot succeed as sent) or 'server'

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
            created_at=utc(self.created_at),
            started_at=utc_or_none(self.started_at),
            finished_at=utc_or_none(self.finished_at),
            result=self.result() if with_result else None,
            error=self.error,
        )


@dataclass(frozen=True)
class KeyedJob:
    """What an Idempotency-Key names: its job (or, once the job expired, what is remembered of it)."""

    job_id: str
    status: JobStatus
    request_hash: str | None
    error: str | None


@dataclass(frozen=True)
class TrainingLogEntry:
    """What one forward_backward or optim_step reported (a point of the run's curves)."""

    job_id: str
    run_id: str
    step: int  # the optimizer step it belongs to: a gradient goes into the run's step + 1
    kind: str  # 'forward_backward' or 'optim_step'
    recorded_at: float
    loss: float | None = None  # forward_backward: summed over the batch
    num_tokens: int | None = None  # forward_backward: positions that carried loss
    weight_sum: float | None = None  # forward_backward, cross_entropy: the sum of its weights
    grad_norm: float | None = None  # optim_step
    learning_rate: float | None = None  # optim_step


@dataclass(frozen=True)
class LastLoss:
    """A run's newest step with a forward_backward: the loss summed over it, and its denominator
    (the weight sum where recorded, else the tokens that carried loss)."""

    step: int
    loss: float
    tokens: float


@dataclass(frozen=True)
class EvaluationRecord:
    """A harness's scores of a run's adapter (`checkpoint` None: its live adapter) at `step`."""

    id: str
    run_id: str
    checkpoint: str | None
    step: int
    report: dict[str, Any]  # harness, tasks, scores, config
    created_at: float


@dataclass(frozen=True)
class SessionRecord:
    """A Tinker client session."""

    id: str
    owner: str
    metadata: dict[str, Any]
    created_at: float
    heartbeat_at: float
    finished_at: float | None = None


@dataclass(frozen=True)
class SamplerRecord:
    """A Tinker sampling session: a base model, or a saved adapter (`checkpoint` '<run_id>/<name>')."""

    id: str
    owner: str
    base_model: str
    checkpoint: str | None
    model_path: str | None
    created_at: float
