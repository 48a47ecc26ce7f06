"""The Tinker protocol's serving logic, behind the thin routes of router.py.

`TinkerServing` holds the protocol's own state explicitly: the client sessions and sampling
sessions (in the database), the per-model training order (`Sequencer`) and what a future's
answer needs beyond its job's result (`FutureExtras`). Each operation returns a typed value
(`FutureRef`, or a protocol body); requests the service refuses become failed futures with
category "user", as Tinker reports errors through futures.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from ...backend.results import (
    ForwardBackwardResult,
    JobKind,
    Loaded,
    OptimStepResult,
    RunCreated,
    Samples,
    parse_result,
)
from ...types import (
    LOSS_FNS,
    CheckpointInfo,
    CreateRunRequest,
    ForwardBackwardRequest,
    JobRef,
    LoadRequest,
    LoraConfig,
    OptimStepRequest,
    RunInfo,
    SamplingParams,
    SaveRequest,
)
from ..checkpoints import CheckpointKind
from ..downloads import check_age_recipients
from ..records import INTERRUPTED, JobRecord
from ..service import LimitExceeded, Service, ServiceError
from . import protocol as p
from . import wire
from .provenance import ProvenanceError, RecordedSequence, StabilityRecords, resolve, session_of_id

log = logging.getLogger(__name__)

POLL_SECONDS = 25.0  # a retrieve_future holds this long before answering try_again (the SDK waits 45 s)
TURN_SECONDS = 30.0  # a training request arriving before its predecessor waits this long for it
_EXTRAS_KEPT = 100_000
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]


def error_body(status: int, message: str, loc: tuple | None = None) -> JSONResponse:
    """Tinker's error shape. A 409 (which the SDK retries for minutes) goes out as a 400."""
    content: dict[str, Any] = {"error": message, "category": "user" if status < 500 else "server"}
    if loc:
        content["loc"] = list(loc)
    return JSONResponse(status_code=400 if status == 409 else status, content=content)


@dataclass(frozen=True)
class FutureRef:
    """A submitted request's answer: the future to poll, and what the SDK reads beside it."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None

    def body(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("request_id", self.request_id),
                ("model_id", self.model_id),
                ("sample_sequence_ids", self.sample_sequence_ids),
            )
            if v is not None
        }


@dataclass(frozen=True)
class FutureExtra:
    """What a future's answer needs beyond its job's result."""

    sampling_session_id: str | None = None  # an unnamed sampler snapshot's session
    path: str | None = None  # a load's tinker path, echoed back
    model_id: str | None = None
    # A sample of a client made with record_stability_info: its session and prompt, to record
    # its sequences when they are answered.
    stability_session: str | None = None
    prompt: tuple[int, ...] = ()
    target_grid: wire.TargetGrid | None = None  # a sample's target_prompt_logprobs: the answer's layout


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


@dataclass
class FutureExtras:
    """FutureExtra by job id, the newest _EXTRAS_KEPT (a future is retrieved soon after it is made)."""

    _by_job: OrderedDict[str, FutureExtra] = field(default_factory=OrderedDict)

    def remember(self, job_id: str, extra: FutureExtra) -> None:
        self._by_job[job_id] = extra
        while len(self._by_job) > _EXTRAS_KEPT:
            self._by_job.popitem(last=False)

    def get(self, job_id: str) -> FutureExtra:
        return self._by_job.get(job_id) or FutureExtra()


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


class TinkerServing:
    """The Tinker protocol over one Service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.sequencer = Sequencer()
        self.extras = FutureExtras()
        self.stability = StabilityRecords()  # sequences sampled with record_stability_info
        self.liveness = SessionLiveness(service.settings.tinker_session_timeout_seconds)

    # ------------------------------------------------------------------ helpers
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

    # ------------------------------------------------------------------ sessions
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

    # ------------------------------------------------------------------ models
    def create_model(self, user: str, body: p.CreateModel, key: str | None) -> FutureRef:
        model_id = model_id_of(body.session_id, body.model_seq_id)
        try:
            self.session_of(user, body.session_id)
            p.check_optimizer_config(body.optimizer_config)
            lora = body.lora_config
            if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
                raise ServiceError(422, "train_attn, train_mlp or train_unembed must be true", ("lora_config",))
            targets = (
                "all-linear"
                if lora.train_attn and lora.train_mlp
                else (_ATTN if lora.train_attn else _MLP if lora.train_mlp else [])
            )
            request = CreateRunRequest(
                base_model=body.base_model,
                seed=lora.seed or 0,
                lora=LoraConfig(rank=lora.rank, alpha=32.0, target_modules=targets, train_unembed=lora.train_unembed),
            )
            metadata = {"user_metadata": body.user_metadata or {}, "lora_config": lora.model_dump()}
            ref = self.service.submit_create_run(user, request, key, run_id=model_id, metadata=metadata)
        except (ServiceError, ValidationError, ValueError) as exc:
            return self._refused(user, JobKind.create_run, None, exc)
        self.sequencer.start(model_id)
        return FutureRef(ref.job_id, model_id=model_id)

    def model_info(self, user: str, model_id: str) -> dict:
        run = self.service.get_run(user, model_id)
        info = self.service.models.get(run.base_model)
        return {
            "model_id": run.id,
            "model_data": {
                "arch": info.architecture if info else None,
                "model_name": run.base_model,
                "tokenizer_id": info.tokenizer_id if info else run.base_model,
            },
            "optimizer_config": p.ADAMW,
            "is_lora": True,
            "lora_rank": run.lora.rank,
            "model_name": run.base_model,
        }

    # ------------------------------------------------------------------ training
    async def forward_backward(self, user: str, raw: bytes, encoding: str | None, key: str | None) -> FutureRef:
        settings = self.service.settings
        # Off the event loop: inflating and decoding take time that grows with the body.
        call = await run_in_threadpool(
            wire.decode_forward_backward,
            raw,
            encoding,
            max_decompressed_bytes=settings.max_request_bytes,
            max_elements=settings.max_tokens_per_request,
        )
        if (refused := self._not_owned(user, JobKind.forward_backward, call.model_id)) is not None:
            return refused
        async with self.sequencer.turn(call.model_id, call.seq_id):
            # Off the event loop too: checking every token and hashing the request grow with the body.
            return await run_in_threadpool(self._submit_forward_backward, user, call, key)

    def _submit_forward_backward(self, user: str, call: wire.ForwardBackwardCall, key: str | None) -> FutureRef:
        """Validate a decoded forward_backward and queue its job (a worker thread, in its turn)."""
        try:
            if call.loss_fn not in LOSS_FNS:
                raise ServiceError(
                    422,
                    f"loss_fn {call.loss_fn!r} is not supported by this server; it supports {', '.join(LOSS_FNS)}",
                    ("loss_fn",),
                )
            data = self._with_recorded_logprobs(call) if call.loss_fn == "stable_reinforce" else call.data
            request = ForwardBackwardRequest(
                data=data, loss_fn=call.loss_fn, loss_fn_config=call.loss_fn_config or None
            )
            ref = self.service.submit_forward_backward(
                user, call.model_id, request, key, forward_only=call.forward_only, all_logprobs=True
            )
        except (ServiceError, ValidationError) as exc:
            return self._refused(user, JobKind.forward_backward, call.model_id, exc)
        return FutureRef(ref.job_id, model_id=call.model_id)

    def _with_recorded_logprobs(self, call: wire.ForwardBackwardCall) -> list:
        """stable_reinforce's data with the sampler's recorded logprobs in `logprobs` wherever a
        run of sampled tokens covers a target; 422 naming the datum when its provenance is
        missing or does not match the record."""
        session_id = session_of_id(call.model_id)
        data = []
        for i, (datum, provenance) in enumerate(zip(call.data, call.provenance)):
            if provenance is None:
                raise ServiceError(
                    422,
                    f"data[{i}] has no provenance: stable_reinforce needs every datum to name the "
                    "sampled sequences behind its tokens (Datum.with_provenance)",
                    ("data", i, "loss_fn_input_spans"),
                )
            inputs = datum.loss_fn_inputs
            if inputs.targets_per_position is not None:
                raise ServiceError(
                    422,
                    f"data[{i}].loss_fn_inputs.target_tokens is [N, K]; stable_reinforce takes [N]",
                    ("data", i, "loss_fn_inputs", "target_tokens"),
                )
            try:
                recorded = resolve(
                    self.stability, session_id, i, provenance, datum.model_input.tokens, inputs.flat_target_tokens()
                )
            except ProvenanceError as exc:
                raise ServiceError(422, exc.message, exc.loc) from None
            if inputs.logprobs is None:
                data.append(datum)  # refused by name when the request is built
                continue
            logprobs = [sent if mine is None else mine for sent, mine in zip(inputs.logprobs, recorded)]
            data.append(datum.model_copy(update={"loss_fn_inputs": inputs.model_copy(update={"logprobs": logprobs})}))
        return data

    async def optim_step(self, user: str, body: p.OptimStep, key: str | None) -> FutureRef:
        if (refused := self._not_owned(user, JobKind.optim_step, body.model_id)) is not None:
            return refused
        async with self.sequencer.turn(body.model_id, body.seq_id):
            try:
                request = OptimStepRequest(adam_params=body.adam())
                ref = self.service.submit_optim_step(user, body.model_id, request, key)
            except (ServiceError, ValidationError, ValueError) as exc:
                return self._refused(user, JobKind.optim_step, body.model_id, exc)
        return FutureRef(ref.job_id, model_id=body.model_id)

    # ------------------------------------------------------------------ checkpoints
    async def save_weights(self, user: str, body: p.SaveWeights, key: str | None) -> FutureRef:
        if (refused := self._not_owned(user, JobKind.save, body.model_id)) is not None:
            return refused
        async with self.sequencer.turn(body.model_id, body.seq_id):
            try:
                ref = self.service.submit_save(
                    user,
                    body.model_id,
                    SaveRequest(name=body.path),
                    key,
                    kind=CheckpointKind.training,
                    field="path",
                    ttl_seconds=body.ttl_seconds,
                    overwrite=body.overwrite,
                    meta={"user_metadata": body.user_metadata},
                )
            except (ServiceError, ValidationError) as exc:
                return self._refused(user, JobKind.save, body.model_id, exc)
        return FutureRef(ref.job_id, model_id=body.model_id)

    async def save_weights_for_sampler(self, user: str, body: p.SaveWeightsForSampler, key: str | None) -> FutureRef:
        if (refused := self._not_owned(user, JobKind.save, body.model_id)) is not None:
            return refused
        async with self.sequencer.turn(body.model_id, body.seq_id):
            try:
                if body.path is not None:
                    ref = self.service.submit_save(
                        user,
                        body.model_id,
                        SaveRequest(name=body.path),
                        key,
                        kind=CheckpointKind.sampler,
                        field="path",
                        ttl_seconds=body.ttl_seconds,
                        meta={"user_metadata": body.user_metadata},
                    )
                else:
                    ref = self._save_session_snapshot(user, body, key)
            except (ServiceError, ValidationError) as exc:
                return self._refused(user, JobKind.save, body.model_id, exc)
        return FutureRef(ref.job_id, model_id=body.model_id)

    def _save_session_snapshot(self, user: str, body: p.SaveWeightsForSampler, key: str | None) -> JobRef:
        """An unnamed snapshot for a sampling session of the current weights: saved like a named
        one, so that it stays what it is however the run trains on. The service prunes the run's
        older ones (never a named checkpoint)."""
        if body.sampling_session_seq_id is None:
            raise ServiceError(422, "give path or sampling_session_seq_id", ("path",))
        session_id = body.model_id.split(":train:")[0]
        sampler_id = f"{session_id}:sample:{body.sampling_session_seq_id}"
        ref, checkpoint = self.service.submit_sampler_snapshot(
            user, body.model_id, sampler_id, key, ttl_seconds=body.ttl_seconds
        )
        run = self.service.get_run(user, body.model_id)
        self.service.add_sampler(user, sampler_id, run.base_model, checkpoint, None)
        self.extras.remember(ref.job_id, FutureExtra(sampling_session_id=sampler_id))
        return ref

    async def save_weights_external(self, user: str, body: p.SaveWeightsExternal, key: str | None) -> FutureRef:
        """The adapter as a PEFT folder, downloadable through external_weights_urls (its files
        encrypted to `age_encryption_recipients` as they go out, when given)."""
        if (refused := self._not_owned(user, JobKind.save, body.model_id)) is not None:
            return refused
        async with self.sequencer.turn(body.model_id, body.seq_id):
            try:
                recipients = body.age_encryption_recipients
                meta = {"age_recipients": check_age_recipients(recipients)} if recipients is not None else {}
                ref = self.service.submit_save(
                    user,
                    body.model_id,
                    SaveRequest(name=body.path),
                    key,
                    field="path",
                    kind=CheckpointKind.external,
                    ttl_seconds=body.ttl_seconds,
                    meta=meta,
                )
            except (ServiceError, ValidationError) as exc:
                return self._refused(user, JobKind.save, body.model_id, exc)
        return FutureRef(ref.job_id, model_id=body.model_id)

    async def load_weights(self, user: str, body: p.LoadWeights, key: str | None) -> FutureRef:
        if body.weights_access_token is not None:
            raise ServiceError(
                422,
                "weights_access_token is not supported by this server: the checkpoint's owner "
                "publishes it instead (RestClient.publish_checkpoint_from_tinker_path)",
                ("weights_access_token",),
            )
        if body.model_id is None:
            return self._create_from_state(user, body, key)
        if (refused := self._not_owned(user, JobKind.load, body.model_id)) is not None:
            return refused
        async with self.sequencer.turn(body.model_id, body.seq_id):
            try:
                p.check_optimizer_config(body.optimizer_config)
                source, name = p.parse_tinker_path(body.path)
                ref = self.service.submit_load(
                    user, body.model_id, LoadRequest(checkpoint=f"{source}/{name}"), key, with_optimizer=body.optimizer
                )
            except (ServiceError, ValidationError, ValueError) as exc:
                return self._refused(user, JobKind.load, body.model_id, exc)
        self.extras.remember(ref.job_id, FutureExtra(path=body.path, model_id=body.model_id))
        return FutureRef(ref.job_id, model_id=body.model_id)

    def _create_from_state(self, user: str, body: p.LoadWeights, key: str | None) -> FutureRef:
        """create_training_client_from_state: a new model from the checkpoint."""
        if body.session_id is None or body.model_seq_id is None:
            raise ServiceError(422, "give model_id, or session_id and model_seq_id", ("model_id",))
        model_id = model_id_of(body.session_id, body.model_seq_id)
        try:
            self.session_of(user, body.session_id)
            p.check_optimizer_config(body.optimizer_config)
            source, name = p.parse_tinker_path(body.path)
            request = CreateRunRequest(base_model=body.base_model, from_checkpoint=f"{source}/{name}")
            ref = self.service.submit_create_run(
                user,
                request,
                key,
                run_id=model_id,
                with_optimizer=body.optimizer,
                metadata={"user_metadata": body.user_metadata or {}},
            )
        except (ServiceError, ValidationError, ValueError) as exc:
            return self._refused(user, JobKind.create_run, None, exc)
        self.sequencer.start(model_id)
        self.extras.remember(ref.job_id, FutureExtra(path=body.path, model_id=model_id))
        return FutureRef(ref.job_id, model_id=model_id)

    # ------------------------------------------------------------------ sampling
    def create_sampling_session(self, user: str, body: p.CreateSamplingSession) -> str:
        self.session_of(user, body.session_id)
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        if body.model_path is not None:
            try:
                run_id, name = p.parse_tinker_path(body.model_path)
            except ValueError as exc:
                raise ServiceError(422, str(exc), ("model_path",)) from None
            self.service.checkpoint_path(user, f"{run_id}/{name}", field="model_path", published=True)  # else 404
            base_model = self.service.run_record(run_id).base_model
            self.service.add_sampler(user, sampler_id, base_model, f"{run_id}/{name}", body.model_path)
        elif body.base_model is not None:
            self.service.add_sampler(user, sampler_id, self.service.model(body.base_model), None, None)
        else:
            raise ServiceError(422, "give model_path or base_model", ("model_path",))
        return sampler_id

    def sampler(self, user: str, sampler_id: str) -> dict:
        sampler = self.service.sampler(user, sampler_id)
        if sampler is None:
            raise ServiceError(404, f"sampler {sampler_id} not found")
        return {"sampler_id": sampler.id, "base_model": sampler.base_model, "model_path": sampler.model_path}

    def sample(self, user: str, body: p.ASample, key: str | None) -> FutureRef:
        try:
            ref = self._submit_sample(user, body, key)
        except (ServiceError, ValidationError, wire.WireError) as exc:
            if isinstance(exc, LimitExceeded) and exc.clears:
                raise  # a 429: the SDK's sampling backpressure waits a second and sends it again
            failed = self._refused(user, JobKind.sample, None, exc)
            # The SDK wants an id per sample even for a request that fails (it then reads none of them);
            # no more than the server could ever sample, whatever num_samples claims.
            count = min(body.num_samples, self.service.settings.max_samples_per_request)
            return FutureRef(failed.request_id, sample_sequence_ids=[f"{failed.request_id}:{i}" for i in range(count)])
        return FutureRef(ref.job_id, sample_sequence_ids=[f"{ref.job_id}:{i}" for i in range(body.num_samples)])

    def _submit_sample(self, user: str, body: p.ASample, key: str | None) -> JobRef:
        refusal = body.unsupported()
        if refusal is not None:
            raise ServiceError(422, refusal)
        sampler = self.service.sampler(user, body.sampling_session_id)
        if sampler is None:
            raise ServiceError(404, f"sampling session {body.sampling_session_id} not found")
        prompt = wire.decode_model_input_json(body.prompt)
        grid = None if body.target_prompt_logprobs is None else wire.decode_target_grid(body.target_prompt_logprobs)
        stop, stop_ids = wire.parse_stop(body.sampling_params.stop)
        sp = body.sampling_params
        params = SamplingParams(
            max_tokens=sp.max_tokens or min(self.service.settings.max_new_tokens, 256),
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=max(sp.top_k, 0),
            stop=stop,
            stop_token_ids=stop_ids,
            seed=sp.seed,
            ignore_eos=wire.stop_disables_eos(sp.stop),
        )
        snapshot = None
        if sampler.checkpoint is not None:
            snapshot, _ = self.service.checkpoint_path(
                user, sampler.checkpoint, field="sampling_session_id", published=True
            )
        session_id = self._live_session_of_sampler(user, body.sampling_session_id)
        ref = self.service.submit_sample_tokens(
            user,
            sampler.base_model,
            None,
            [prompt],
            body.num_samples,
            params,
            body,
            key,
            snapshot=snapshot,
            prompt_logprobs=bool(body.prompt_logprobs) or body.topk_prompt_logprobs > 0,
            topk_prompt_logprobs=body.topk_prompt_logprobs,
            topk_logprobs=body.topk_sample_logprobs,
            prompt_logprobs_last_n=body.prompt_logprobs_last_n,
            prompt_targets=None if grid is None else [grid.rows],
            prompt_alt_tokens_k=body.prompt_alt_tokens_k,
            consumers_gone=lambda: self.liveness.ended(session_id),
        )
        # record_stability_info: the sequences are recorded when the answer is first read (_answer).
        stability = session_of_id(body.sampling_session_id) if body.record_stability_info else None
        if grid is not None or stability is not None:
            self.extras.remember(
                ref.job_id,
                FutureExtra(target_grid=grid, stability_session=stability, prompt=tuple(prompt) if stability else ()),
            )
        return ref

    def _live_session_of_sampler(self, user: str, sampler_id: str) -> str:
        """The client session a sampler belongs to (its futures' only reader), known to the liveness
        record; a sample for a session that has ended is refused."""
        session_id = sampler_id.rsplit(":sample:", 1)[0]
        if session_id not in self.liveness:  # e.g. after a restart
            session = self.service.session(user, session_id)
            if session is not None:
                self.liveness.beat(session_id, session.heartbeat_at)
                if session.finished_at is not None:
                    self.liveness.finish(session_id)
        if self.liveness.ended(session_id):
            raise ServiceError(410, f"session {session_id} has ended; create a new ServiceClient")
        return session_id

    # ------------------------------------------------------------------ futures
    async def retrieve(self, user: str, request_id: str) -> Response:
        try:
            record = await self.service.wait_job(user, request_id, POLL_SECONDS)
        except ServiceError:
            return error_body(404, f"future {request_id} not found (unknown, or expired)")
        if not record.finished:
            return JSONResponse({"type": "try_again", "request_id": record.id, "queue_state": "active"})
        if record.error is not None:
            if record.error == INTERRUPTED and record.kind is JobKind.sample:
                return error_body(410, record.error)  # the SDK submits a sample again on 410
            return JSONResponse({"error": record.error, "category": record.error_category or "server"})
        # Off the event loop: reading a large result and encoding it as protobuf take milliseconds.
        return await run_in_threadpool(self._answer, user, record)

    def _answer(self, user: str, record: JobRecord) -> Response:
        assert record.result_json is not None, "a completed job has its result"
        value, extra = parse_result(record.kind, record.result_json), self.extras.get(record.id)
        if isinstance(value, ForwardBackwardResult):
            logprobs = [[_known(lp) for lp in row] for row in value.logprobs]
            body = wire.encode_forward_backward_output(logprobs, {"loss:sum": value.loss})
            return Response(body, media_type="application/x-protobuf")
        if isinstance(value, Samples):
            if extra.stability_session is not None:
                for i, seq in enumerate(value.sequences[0]):
                    self.stability.record(
                        f"{record.id}:{i}",
                        RecordedSequence(extra.stability_session, extra.prompt, tuple(seq.tokens), tuple(seq.logprobs)),
                    )
            targets, alt = value.target_prompt_logprobs, value.prompt_alt_tokens
            if targets is not None and extra.target_grid is None:  # its layout was lost (a restart): sample again
                return error_body(410, "this sample's target_prompt_logprobs layout is gone; send it again")
            body = wire.encode_sample_response(
                value.sequences[0],
                prompt_logprobs=None if value.prompt_logprobs is None else value.prompt_logprobs[0],
                topk_prompt_logprobs=None if value.topk_prompt_logprobs is None else value.topk_prompt_logprobs[0],
                target_prompt_logprobs=None
                if targets is None or extra.target_grid is None
                else extra.target_grid.answer(targets[0]),
                prompt_alt_tokens=None if alt is None else (alt[0].tokens, alt[0].logprobs),
            )
            return Response(body, media_type="application/x-protobuf")
        if isinstance(value, RunCreated):
            return JSONResponse({"model_id": record.run_id, **({"path": extra.path} if extra.path else {})})
        if isinstance(value, OptimStepResult):
            return JSONResponse({"metrics": value.model_dump()})
        if isinstance(value, CheckpointInfo):  # a save's
            if extra.sampling_session_id is not None:
                return JSONResponse({"sampling_session_id": extra.sampling_session_id})
            return JSONResponse({"path": p.tinker_path(value.run_id, value.name)})
        if isinstance(value, Loaded):
            return JSONResponse({"path": extra.path, "model_id": record.run_id})
        return JSONResponse(value.model_dump(mode="json"))

    # ------------------------------------------------------------------ RestClient: runs and checkpoints
    def _checkpoint_json(self, run_id: str, info: CheckpointInfo) -> dict:
        checkpoint, kind = p.checkpoint_id(info.name)
        metadata = self.service.checkpoint_meta(f"{run_id}/{info.name}").get("user_metadata")
        return {
            "checkpoint_id": checkpoint,
            "checkpoint_type": kind,
            "time": info.created_at.isoformat(),
            "tinker_path": p.tinker_path(run_id, info.name),
            "public": info.public,
            "size_bytes": _size(self.service.data_dir / info.path),
            "user_metadata": metadata,
            "expires_at": None if info.expires_at is None else info.expires_at.isoformat(),
        }

    def _training_run_json(self, run: RunInfo) -> dict:
        record = self.service.run_record(run.id)
        training = [c for c in _unexpired(run.checkpoints) if p.checkpoint_id(c.name)[1] == "training"]
        sampler = [c for c in _unexpired(run.checkpoints) if p.checkpoint_id(c.name)[1] == "sampler"]
        metadata = record.metadata.get("user_metadata") or {}
        return {
            "training_run_id": run.id,
            "base_model": run.base_model,
            "model_owner": record.owner,
            "is_lora": True,
            "corrupted": False,
            "lora_rank": run.lora.rank,
            "last_request_time": run.created_at.isoformat(),
            "last_checkpoint": self._checkpoint_json(run.id, training[-1]) if training else None,
            "last_sampler_checkpoint": self._checkpoint_json(run.id, sampler[-1]) if sampler else None,
            "user_metadata": {k: str(v) for k, v in metadata.items()},
        }

    def training_runs(self, user: str, limit: int, offset: int) -> dict:
        runs = self.service.list_runs(user)
        page = runs[offset : offset + limit]
        return {
            "training_runs": [self._training_run_json(r) for r in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
        }

    def training_run(self, user: str, run_id: str) -> dict:
        return self._training_run_json(self.service.get_run(user, run_id))

    def run_checkpoints(self, user: str, run_id: str) -> dict:
        run = self.service.get_run(user, run_id)
        return {"checkpoints": [self._checkpoint_json(run_id, c) for c in _unexpired(run.checkpoints)]}

    def user_checkpoints(self, user: str, limit: int, offset: int) -> dict:
        every = _unexpired(self.service.user_checkpoints(user))
        return {
            "checkpoints": [self._checkpoint_json(c.run_id, c) for c in every[offset : offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(every)},
        }

    def our_checkpoint(self, user: str, run_id: str, checkpoint: str) -> tuple[str, Path]:
        """Tinker's checkpoint id of one of the user's runs -> (our name, its folder)."""
        try:
            name = p.from_checkpoint_id(checkpoint)
        except ValueError as exc:
            raise ServiceError(422, str(exc), ("checkpoint_id",)) from None
        path, _ = self.service.checkpoint_path(user, f"{run_id}/{name}")
        return name, path

    def delete_checkpoint(self, user: str, run_id: str, checkpoint: str) -> None:
        name, _ = self.our_checkpoint(user, run_id, checkpoint)
        self.service.delete_checkpoint(user, run_id, name)

    def weights_info(self, user: str, tinker_path: str) -> dict:
        try:
            run_id, name = p.parse_tinker_path(tinker_path)
        except ValueError as exc:
            raise ServiceError(422, str(exc), ("tinker_path",)) from None
        path, _ = self.service.checkpoint_path(user, f"{run_id}/{name}", field="tinker_path", published=True)
        state = self.service.checkpoint_state(path, "tinker_path")
        targets = state.lora.target_modules
        return {
            "base_model": state.base_model,
            "optimizer_config": p.ADAMW,
            "is_lora": True,
            "lora_rank": state.lora.rank,
            "train_attn": targets == "all-linear" or any(t in targets for t in _ATTN),
            "train_mlp": targets == "all-linear" or any(t in targets for t in _MLP),
            "train_unembed": state.lora.train_unembed,
        }


def _known(logprob: Any) -> Any:
    """A logprob, or a row of K, with None (not computed) as 0.0."""
    if isinstance(logprob, list):
        return [0.0 if lp is None else lp for lp in logprob]
    return 0.0 if logprob is None else logprob


def _unexpired(checkpoints: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """Expired checkpoints leave listings at once, before the sweep deletes them."""
    now = datetime.now(timezone.utc)
    return [c for c in checkpoints if c.expires_at is None or c.expires_at > now]


def _size(path: Path) -> int | None:
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    except OSError:
        return None
