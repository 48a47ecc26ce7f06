"""The Tinker protocol under `/api/v1/`, beside the REST API on the same service: the official
`tinker` SDK (0.38) and tinker-cookbook run against it unmodified.

Mutating calls answer a future (`{"request_id"}`: the job id) at once; `retrieve_future`
long-polls the job and answers `try_again`, `{"error", "category"}`, or the result (protobuf for
forward/forward_backward and samples, JSON otherwise). A Tinker model is a run whose id is
`<session_id>:train:<n>`, as the SDK computes it; checkpoints are the run's checkpoints, those
saved for sampling named `sampler_weights.<name>`. Requests the service refuses become failed
futures with category "user" (Tinker reports errors through futures); bodies that do not parse
are 400s in Tinker's error shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from ...types import (
    LOSS_FNS,
    CreateRunRequest,
    ForwardBackwardRequest,
    JobRef,
    LoadRequest,
    LoraConfig,
    OptimStepRequest,
    SamplingParams,
    SaveRequest,
)
from ..auth import User
from ..checkpoints import CheckpointKind
from ..downloads import check_age_recipients
from ..service import Service, ServiceError
from ..store import INTERRUPTED, JobRecord, SessionStore
from . import protocol as p
from . import wire
from .checkpoint_routes import checkpoint_router

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
POLL_SECONDS = 25.0  # a retrieve_future holds this long before answering try_again (the SDK waits 45 s)
TURN_SECONDS = 30.0  # a training request arriving before its predecessor waits this long for it
_ANSWERS_KEPT = 100_000
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]

IdempotencyKey = Annotated[str | None, Header(alias="X-Idempotency-Key", max_length=200, include_in_schema=False)]


def error_body(status: int, message: str, loc: tuple | None = None) -> JSONResponse:
    """Tinker's error shape. A 409 (which the SDK retries for minutes) goes out as a 400."""
    content: dict[str, Any] = {"error": message, "category": "user" if status < 500 else "server"}
    if loc:
        content["loc"] = list(loc)
    return JSONResponse(status_code=400 if status == 409 else status, content=content)


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
                log.warning("model %s: seq_id %d went ahead after waiting %.0f s for seq_id %d", model_id, seq_id,
                            TURN_SECONDS, self._next[model_id])
        try:
            yield
        finally:
            async with self._changed:
                self._next[model_id] = max(self._next.get(model_id, 0), seq_id + 1)
                self._changed.notify_all()


def tinker_router(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["tinker"])
    sessions = SessionStore(service.store)
    sequencer = Sequencer()
    # What a future's answer needs beyond its job's result (an unnamed sampler's id), by job id;
    # the newest _ANSWERS_KEPT (a future is retrieved soon after it is made).
    answers: OrderedDict[str, dict] = OrderedDict()

    def remember(job_id: str, extra: dict) -> None:
        answers[job_id] = extra
        while len(answers) > _ANSWERS_KEPT:
            answers.popitem(last=False)

    def future(ref: JobRef, **extra) -> dict:
        return {"request_id": ref.job_id, **extra}

    def refused(user: str, kind: str, run_id: str | None, exc: Exception) -> dict:
        message = exc.message if isinstance(exc, (ServiceError, wire.WireError)) else str(exc)
        if isinstance(exc, ServiceError) and exc.loc:
            message = f"{'.'.join(str(part) for part in exc.loc)}: {message}"
        return future(service.failed_job(user, kind, run_id, message))

    def session_of(user: str, session_id: str):
        row = sessions.session(session_id, user)
        if row is None:
            raise ServiceError(404, f"session {session_id} not found")
        if row["finished_at"] is not None or time.time() - row["heartbeat_at"] > service.settings.tinker_session_timeout_seconds:
            raise ServiceError(410, f"session {session_id} has ended; create a new ServiceClient")
        return row

    def model_id_of(session_id: str, model_seq_id: int) -> str:
        return f"{session_id}:train:{model_seq_id}"

    # ------------------------------------------------------------------ client set-up
    @router.post("/client/config")
    def client_config(user: User) -> dict:
        return {}  # every flag at its default: protobuf bodies, no zstd, no JWT exchange

    @router.post("/client/dynamic_config")
    def dynamic_config(user: User) -> dict:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @router.post("/telemetry")
    def telemetry(user: User) -> dict:
        return {"status": "accepted"}  # accepted and dropped: nothing leaves this machine

    @router.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/get_server_capabilities")
    def capabilities(user: User) -> dict:
        return {"supported_models": [
            {"model_name": m.name, "max_context_length": m.max_context_length, "trainable": True, "sampleable": True}
            for m in service.models.values()
        ]}

    @router.post("/create_session")
    def create_session(body: p.CreateSession, user: User) -> dict:
        session_id = f"sess_{uuid.uuid4().hex[:16]}"
        sessions.add_session(session_id, user, {"tags": body.tags, "user_metadata": body.user_metadata,
                                                "sdk_version": body.sdk_version})
        return {"session_id": session_id}

    @router.post("/session_heartbeat")
    def heartbeat(body: p.SessionRef, user: User) -> dict:
        session_of(user, body.session_id)
        sessions.heartbeat(body.session_id)
        return {}

    @router.post("/sessions/{session_id}/finish")
    def finish_session(session_id: str, user: User) -> dict:
        if sessions.session(session_id, user) is None:
            raise ServiceError(404, f"session {session_id} not found")
        sessions.finish(session_id)
        return {}

    @router.get("/sessions")
    def list_sessions(user: User) -> dict:
        return {"sessions": [row["id"] for row in sessions.sessions(user)]}

    @router.get("/sessions/{session_id}")
    def get_session(session_id: str, user: User) -> dict:
        row = sessions.session(session_id, user)
        if row is None:
            raise ServiceError(404, f"session {session_id} not found")
        runs = [r.id for r in service.list_runs(user) if r.id.startswith(f"{session_id}:train:")]
        return {"training_run_ids": runs, "sampler_ids": sessions.samplers_of_session(session_id)}

    # -------------------------------------------------------------------------- models
    @router.post("/create_model")
    def create_model(body: p.CreateModel, user: User, key: IdempotencyKey = None) -> dict:
        model_id = model_id_of(body.session_id, body.model_seq_id)
        try:
            session_of(user, body.session_id)
            lora = body.lora_config
            if not (lora.train_attn or lora.train_mlp):
                raise ServiceError(422, "train_attn or train_mlp must be true (the output head is not trained here)",
                                   ("lora_config",))
            targets = "all-linear" if lora.train_attn and lora.train_mlp else (_ATTN if lora.train_attn else _MLP)
            request = CreateRunRequest(base_model=body.base_model, seed=lora.seed or 0,
                                       lora=LoraConfig(rank=lora.rank, alpha=32.0, target_modules=targets))
            metadata = {"user_metadata": body.user_metadata or {}, "lora_config": lora.model_dump()}
            ref = service.submit_create_run(user, request, key, run_id=model_id, metadata=metadata)
        except (ServiceError, ValidationError) as exc:
            return refused(user, "create_run", None, exc)
        sequencer.start(model_id)
        return future(ref, model_id=model_id)

    @router.post("/get_info")
    def get_info(body: p.ModelRef, user: User) -> dict:
        run = service.get_run(user, body.model_id)
        info = service.models.get(run.base_model)
        return {
            "model_id": run.id,
            "model_data": {"arch": info.architecture if info else None, "model_name": run.base_model,
                           "tokenizer_id": info.tokenizer_id if info else run.base_model},
            "is_lora": True,
            "lora_rank": run.lora.rank,
            "model_name": run.base_model,
        }

    # ------------------------------------------------------------------------ training
    @router.post("/forward_backward")
    async def forward_backward(request: Request, user: User, key: IdempotencyKey = None) -> dict:
        call = wire.decode_forward_backward(await request.body(), request.headers.get("content-encoding"))
        async with sequencer.turn(call.model_id, call.seq_id):
            try:
                if call.loss_fn not in LOSS_FNS:
                    raise ServiceError(422, f"loss_fn {call.loss_fn!r} is not supported by this server; "
                                            f"it supports {', '.join(LOSS_FNS)}", ("loss_fn",))
                fb = ForwardBackwardRequest(data=call.data, loss_fn=call.loss_fn, loss_fn_config=call.loss_fn_config or None)
                ref = service.submit_forward_backward(user, call.model_id, fb, key, forward_only=call.forward_only,
                                                      all_logprobs=True)
            except (ServiceError, ValidationError) as exc:
                return refused(user, "forward_backward", call.model_id, exc)
        return future(ref, model_id=call.model_id)

    @router.post("/optim_step")
    async def optim_step(body: p.OptimStep, user: User, key: IdempotencyKey = None) -> dict:
        async with sequencer.turn(body.model_id, body.seq_id):
            try:
                ref = service.submit_optim_step(user, body.model_id, OptimStepRequest(adam_params=body.adam_params.ours()), key)
            except (ServiceError, ValidationError) as exc:
                return refused(user, "optim_step", body.model_id, exc)
        return future(ref, model_id=body.model_id)

    @router.post("/save_weights")
    async def save_weights(body: p.SaveWeights, user: User, key: IdempotencyKey = None) -> dict:
        async with sequencer.turn(body.model_id, body.seq_id):
            try:
                ref = service.submit_save(user, body.model_id, SaveRequest(name=body.path), key, field="path",
                                          kind=CheckpointKind.training, ttl_seconds=body.ttl_seconds,
                                          overwrite=body.overwrite, meta={"user_metadata": body.user_metadata})
            except (ServiceError, ValidationError) as exc:
                return refused(user, "save", body.model_id, exc)
        return future(ref, model_id=body.model_id)

    @router.post("/save_weights_for_sampler")
    async def save_weights_for_sampler(body: p.SaveWeightsForSampler, user: User, key: IdempotencyKey = None) -> dict:
        async with sequencer.turn(body.model_id, body.seq_id):
            try:
                if body.path is not None:
                    ref = service.submit_save(user, body.model_id, SaveRequest(name=body.path), key, field="path",
                                              kind=CheckpointKind.sampler, ttl_seconds=body.ttl_seconds,
                                              meta={"user_metadata": body.user_metadata})
                else:
                    # An unnamed snapshot for a sampling session of the current weights: saved like a
                    # named one, so that it stays what it is however the run trains on.
                    if body.sampling_session_seq_id is None:
                        raise ServiceError(422, "give path or sampling_session_seq_id", ("path",))
                    session_id = body.model_id.split(":train:")[0]
                    sampler_id = f"{session_id}:sample:{body.sampling_session_seq_id}"
                    ref, checkpoint = service.submit_sampler_snapshot(user, body.model_id, sampler_id, key,
                                                                      ttl_seconds=body.ttl_seconds)
                    run = service.get_run(user, body.model_id)
                    sessions.add_sampler(sampler_id, user, run.base_model, checkpoint, None)
                    remember(ref.job_id, {"sampling_session_id": sampler_id})
            except (ServiceError, ValidationError) as exc:
                return refused(user, "save", body.model_id, exc)
        return future(ref, model_id=body.model_id)

    @router.post("/save_weights_external")
    async def save_weights_external(body: p.SaveWeightsExternal, user: User, key: IdempotencyKey = None) -> dict:
        """The adapter as a PEFT folder, downloadable through external_weights_urls (its files
        encrypted to `age_encryption_recipients` as they go out, when given)."""
        async with sequencer.turn(body.model_id, body.seq_id):
            try:
                recipients = body.age_encryption_recipients
                meta = {"age_recipients": check_age_recipients(recipients)} if recipients is not None else {}
                ref = service.submit_save(user, body.model_id, SaveRequest(name=body.path), key, field="path",
                                          kind=CheckpointKind.external, ttl_seconds=body.ttl_seconds, meta=meta)
            except (ServiceError, ValidationError) as exc:
                return refused(user, "save", body.model_id, exc)
        return future(ref, model_id=body.model_id)

    @router.post("/load_weights")
    async def load_weights(body: p.LoadWeights, user: User, key: IdempotencyKey = None) -> dict:
        if body.weights_access_token is not None:
            raise ServiceError(422, "weights_access_token is not supported by this server: the checkpoint's owner "
                                    "publishes it instead (RestClient.publish_checkpoint_from_tinker_path)",
                               ("weights_access_token",))
        if body.model_id is None:  # create_training_client_from_state: a new model from the checkpoint
            if body.session_id is None or body.model_seq_id is None:
                raise ServiceError(422, "give model_id, or session_id and model_seq_id", ("model_id",))
            model_id = model_id_of(body.session_id, body.model_seq_id)
            try:
                session_of(user, body.session_id)
                source, name = p.parse_tinker_path(body.path)
                request = CreateRunRequest(base_model=body.base_model, from_checkpoint=f"{source}/{name}")
                ref = service.submit_create_run(user, request, key, run_id=model_id, with_optimizer=body.optimizer,
                                                metadata={"user_metadata": body.user_metadata or {}})
            except (ServiceError, ValidationError, ValueError) as exc:
                return refused(user, "create_run", None, exc)
            sequencer.start(model_id)
            remember(ref.job_id, {"path": body.path, "model_id": model_id})
            return future(ref, model_id=model_id)
        async with sequencer.turn(body.model_id, body.seq_id):
            try:
                source, name = p.parse_tinker_path(body.path)
                ref = service.submit_load(user, body.model_id, LoadRequest(checkpoint=f"{source}/{name}"), key,
                                          with_optimizer=body.optimizer)
            except (ServiceError, ValidationError, ValueError) as exc:
                return refused(user, "load", body.model_id, exc)
        remember(ref.job_id, {"path": body.path, "model_id": body.model_id})
        return future(ref, model_id=body.model_id)

    # ------------------------------------------------------------------------ sampling
    @router.post("/create_sampling_session")
    def create_sampling_session(body: p.CreateSamplingSession, user: User) -> dict:
        session_of(user, body.session_id)
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        if body.model_path is not None:
            try:
                run_id, name = p.parse_tinker_path(body.model_path)
            except ValueError as exc:
                raise ServiceError(422, str(exc), ("model_path",)) from None
            service.checkpoint_path(user, f"{run_id}/{name}", field="model_path", published=True)  # 404 unless readable
            base_model = service.store.run_row_any(run_id)["base_model"]
            sessions.add_sampler(sampler_id, user, base_model, f"{run_id}/{name}", body.model_path)
        elif body.base_model is not None:
            sessions.add_sampler(sampler_id, user, service.model(body.base_model), None, None)
        else:
            raise ServiceError(422, "give model_path or base_model", ("model_path",))
        return {"sampling_session_id": sampler_id}

    @router.get("/samplers/{sampler_id}")
    def get_sampler(sampler_id: str, user: User) -> dict:
        row = sessions.sampler(sampler_id, user)
        if row is None:
            raise ServiceError(404, f"sampler {sampler_id} not found")
        return {"sampler_id": row["id"], "base_model": row["base_model"], "model_path": row["model_path"]}

    @router.post("/asample")
    def asample(body: p.ASample, user: User, key: IdempotencyKey = None) -> dict:
        try:
            sampler = sessions.sampler(body.sampling_session_id, user)
            if sampler is None:
                raise ServiceError(404, f"sampling session {body.sampling_session_id} not found")
            prompt = wire.decode_model_input_json(body.prompt)
            stop, stop_ids = wire.parse_stop(body.sampling_params.stop)
            sp = body.sampling_params
            params = SamplingParams(
                max_tokens=sp.max_tokens or min(service.settings.max_new_tokens, 256), temperature=sp.temperature,
                top_p=sp.top_p, top_k=max(sp.top_k, 0), stop=stop, stop_token_ids=stop_ids, seed=sp.seed)
            snapshot = None
            if sampler["checkpoint"] is not None:
                snapshot, _ = service.checkpoint_path(user, sampler["checkpoint"], field="sampling_session_id",
                                                      published=True)
            ref = service.submit_sample_tokens(
                user, sampler["base_model"], None, [prompt], body.num_samples, params, body, key, snapshot=snapshot,
                prompt_logprobs=body.prompt_logprobs or body.topk_prompt_logprobs > 0,
                topk_prompt_logprobs=body.topk_prompt_logprobs)
        except (ServiceError, ValidationError, wire.WireError) as exc:
            failed = refused(user, "sample", None, exc)
            # The SDK wants an id per sample even for a request that fails (it then reads none of them);
            # no more than the server could ever sample, whatever num_samples claims.
            count = min(body.num_samples, service.settings.max_samples_per_request)
            return {**failed, "sample_sequence_ids": [f"{failed['request_id']}:{i}" for i in range(count)]}
        return future(ref, sample_sequence_ids=[f"{ref.job_id}:{i}" for i in range(body.num_samples)])

    # ------------------------------------------------------------------------- futures
    @router.post("/retrieve_future")
    async def retrieve_future(body: p.RetrieveFuture, user: User) -> Response:
        try:
            record = await service.wait_job(user, body.request_id, POLL_SECONDS)
        except ServiceError:
            return error_body(404, f"future {body.request_id} not found (unknown, or expired)")
        if not record.finished:
            return JSONResponse({"type": "try_again", "request_id": record.id, "queue_state": "active"})
        if record.error is not None:
            if record.error == INTERRUPTED and record.kind == "sample":
                return error_body(410, record.error)  # the SDK submits a sample again on 410
            return JSONResponse({"error": record.error, "category": record.error_category or "server"})
        return answer(user, record)

    def answer(user: str, record: JobRecord) -> Response:
        value, extra = record.result(), answers.get(record.id, {})
        if record.kind == "forward_backward":
            logprobs = [[0.0 if lp is None else lp for lp in row] for row in value["logprobs"]]
            body = wire.encode_forward_backward_output(logprobs, {"loss:sum": value["loss"]})
            return Response(body, media_type="application/x-protobuf")
        if record.kind == "sample":
            body = wire.encode_sample_response(
                value["sequences"][0],
                prompt_logprobs=(value.get("prompt_logprobs") or [None])[0],
                topk_prompt_logprobs=(value.get("topk_prompt_logprobs") or [None])[0])
            return Response(body, media_type="application/x-protobuf")
        if record.kind == "create_run":
            return JSONResponse({"model_id": record.run_id, **extra})
        if record.kind == "optim_step":
            return JSONResponse({"metrics": {"grad_norm": value["grad_norm"], "learning_rate": value["learning_rate"],
                                             "step": value["step"]}})
        if record.kind == "save":
            if "sampling_session_id" in extra:
                return JSONResponse({"sampling_session_id": extra["sampling_session_id"]})
            return JSONResponse({"path": p.tinker_path(value["run_id"], value["name"])})
        if record.kind == "load":
            return JSONResponse({"path": extra.get("path"), "model_id": record.run_id})
        return JSONResponse(value)

    router.include_router(checkpoint_router(service))
    return router

