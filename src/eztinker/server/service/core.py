"""What every part of the service shares: its state, the models it holds, a run's ownership,
token checks, and job submission (idempotency, admission, waiting for a job to finish).

Routers never reach past the service: what they need of the store, the runner or the backend
(a job's record, a model's tokens, the metrics) the service hands them here.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from ...backend import Backend, InvalidInput, ModelInfo
from ...types import JobRef, JobStatus, Prompt
from ..checkpoints import UrlSigner
from ..datadir import DataDirLock
from ..limits import UserLimits
from ..records import JobRecord, KeyedJob, RunRecord, new_id
from ..runner import Job, JobRunner
from ..settings import ServerSettings
from ..store import Store
from .errors import LimitExceeded, ServiceError, invalid, not_found

# Seeds are stored as SQLite INTEGERs and fed to torch.manual_seed; either raises OverflowError above this,
# and the schema has no upper bound, so checking it up front answers 422 rather than 500.
MAX_SEED = 2**63 - 1


class ServiceCore:
    """The state the parts (runs.py, checkpoints.py, work.py, sessions.py) share; `Service`
    (facade.py) builds it."""

    settings: ServerSettings
    lock: DataDirLock
    backend: Backend
    models: dict[str, ModelInfo]
    default_model: str
    data_dir: Path
    checkpoint_root: Path
    snapshot_root: Path
    store: Store
    runner: JobRunner
    limits: UserLimits
    signer: UrlSigner

    # ----------------------------------------------------------------------------- models

    def model(self, name: str | None, field: tuple = ("base_model",)) -> str:
        """The base model a request names (the default when it names none); 422 listing the
        held ones when this server does not hold it."""
        if name is None:
            return self.default_model
        if name not in self.models:
            raise invalid(field, f"this server does not hold base model {name!r}; it holds {self._held()}")
        return name

    def _held(self) -> str:
        return ", ".join(repr(m) for m in self.models)

    def tokenizer_files(self, model: str | None) -> dict:
        name = self.model(model, ("query", "model"))
        return {"model": name, "files": self.backend.tokenizer_files(name)}

    def token_bytes(self, model: str, tokens: list[int]) -> list[bytes]:
        """Each token's bytes (a token may hold part of a UTF-8 character)."""
        return self.backend.token_bytes(model, tokens)

    def decode(self, model: str, tokens: list[int]) -> str:
        return self.backend.decode(model, tokens)

    def metrics_exposition(self) -> tuple[bytes, str]:
        """The Prometheus metrics page: its body and content type."""
        return self.runner.metrics.exposition()

    # ------------------------------------------------------------------------------- runs
    def owned_run(self, user: str, run_id: str) -> RunRecord:
        """One of the user's live runs (404 otherwise)."""
        run = self.store.run(run_id)
        if run is None or run.owner != user:  # another user's run is as good as absent
            raise not_found(f"run {run_id}")
        return run

    def _usable_run(self, user: str, run_id: str) -> tuple[RunRecord, str]:
        """The run and its base model, which this server must hold to work on it."""
        run = self.owned_run(user, run_id)
        if run.base_model not in self.models:
            raise ServiceError(
                409,
                f"run {run_id} is on base model {run.base_model!r}, which this server "
                f"does not hold (it holds {self._held()}); start it with --model {run.base_model}",
            )
        return run, run.base_model

    def run_record(self, run_id: str) -> RunRecord:
        """A run, deleted or not, whoever owns it: for what outlives it (the base model and owner
        of a checkpoint it saved, which the caller has already found readable)."""
        record = self.store.run_any(run_id)
        if record is None:
            raise not_found(f"run {run_id}")
        return record

    # ----------------------------------------------------------------------------- tokens
    def encode_prompt(self, model: str, prompt: Prompt, loc: tuple) -> list[int]:
        try:
            tokens = self.backend.encode_prompt(model, prompt)
        except InvalidInput as exc:
            raise invalid((*loc, *exc.loc), exc.message) from None
        self.check_tokens(model, tokens, (*loc, "tokens"))
        return tokens

    def _check_total_tokens(self, loc: tuple, total: int, what: str) -> None:
        limit = self.settings.max_tokens_per_request
        if total > limit:
            raise invalid(loc, f"{what} = {total} tokens; the limit is max_tokens_per_request ({limit})")

    def check_tokens(self, model: str, tokens: list[int], loc: tuple) -> None:
        if len(tokens) > self.settings.max_prompt_tokens:
            raise invalid(loc, f"{len(tokens)} tokens; the limit is {self.settings.max_prompt_tokens}")
        vocab = self.models[model].vocab_size
        for position, token in enumerate(tokens):
            if not 0 <= token < vocab:
                raise invalid((*loc, position), f"token id {token} is outside the vocabulary [0, {vocab})")

    # ------------------------------------------------------------------------------- jobs
    def submit(self, user: str, job: Job, request: Any, key: str | None, *, digest: str | None = None) -> JobRef:
        """Record `job` as pending and queue it; a replayed idempotency key returns the original."""
        key = key or None  # an empty Idempotency-Key header is no key (it must not be stored as one)
        command = job.command
        if key and digest is None:
            digest = _request_hash(command.kind, command.run_id, request)
        if key:
            existing = self.store.job_by_key(user, key)
            if existing is not None:
                return self._replay(existing, digest, key)
        job.owner = user
        refusal = self.runner.admit(job, self.limits)
        if refusal is not None:
            raise LimitExceeded(refusal.limit, refusal.message, clears=refusal.clears)
        try:
            self.store.add_job(job.id, user, command.run_id, command.kind, key, digest)
        except sqlite3.IntegrityError:  # the same key raced in from a concurrent retry
            self.runner.withdraw(job.id)
            existing = self.store.job_by_key(user, key) if key else None
            if existing is None or key is None:  # not a key's race: a genuine integrity failure
                raise
            return self._replay(existing, digest, key)
        except BaseException:
            self.runner.withdraw(job.id)
            raise
        self.runner.submit(job)
        return JobRef(job_id=job.id, status=JobStatus.pending)

    @staticmethod
    def _replay(existing: KeyedJob, digest: str | None, key: str) -> JobRef:
        if existing.request_hash != digest:
            raise ServiceError(409, f"Idempotency-Key {key!r} was already used for a different request")
        return JobRef(job_id=existing.job_id, status=existing.status)

    async def _submit_and_wait(self, user: str, job: Job) -> JobRecord:
        job.owner = user  # not admitted: a deletion frees what the limits count, it is never refused
        self.store.add_job(job.id, user, job.command.run_id, job.command.kind)
        self.runner.submit(job)
        return await self._wait_finished(user, job.id)

    async def _wait_finished(self, user: str, job_id: str) -> JobRecord:
        while not (record := self.job(user, job_id)).finished:
            await self.wait_job(user, job_id, 60)
        return record

    def job(self, user: str, job_id: str) -> JobRecord:
        record = self.store.job(job_id)
        if record is None or record.owner != user:
            raise not_found(f"job {job_id}")
        return record

    async def wait_job(self, user: str, job_id: str, wait: float) -> JobRecord:
        """The job, once finished and its recording complete or `wait` seconds passed. A save's
        job is finished from the store's commit, which makes the save the run's restore point, and
        only then are the run's load snapshots dropped: a waiting client is answered after that."""

        def settled(record: JobRecord) -> bool:
            return record.finished and self.runner.settled(job_id)

        record = self.job(user, job_id)
        if not settled(record) and wait > 0:
            await self.runner.wait(job_id, wait, lambda: settled(self.job(user, job_id)))
            record = self.job(user, job_id)
        return record

    def failed_job(self, user: str, kind: str, run_id: str | None, message: str, category: str = "user") -> JobRef:
        """A job that failed before it ran: protocols whose errors travel in futures (Tinker) answer
        a request they refuse with one."""
        job_id = new_id("job")
        self.store.add_job(job_id, user, run_id, kind)
        self.store.mark_finished(job_id, error=message, error_category=category)
        return JobRef(job_id=job_id, status=JobStatus.failed)

    def cancel_job(self, job_id: str, why: str) -> bool:
        """Every consumer of a sample is gone (its client went away): a queued one fails with `why`,
        a running one stops at its next decode step. Other kinds of job are never cancelled."""
        return self.runner.cancel(job_id, why)


def _request_hash(kind: str, run_id: str | None, request: Any) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value.model_dump(mode="json") if hasattr(value, "model_dump") else value

    payload = json.dumps([kind, run_id, plain(request)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
