"""The Tinker protocol under `/api/v1/`, beside the REST API on the same service: the official
`tinker` SDK (0.38) and tinker-cookbook run against it unmodified.

Mutating calls answer a future (`{"request_id"}`: the job id) at once; `retrieve_future`
long-polls the job and answers `try_again`, `{"error", "category"}`, or the result (protobuf for
forward/forward_backward and samples, JSON otherwise). A Tinker model is a run whose id is
`<session_id>:train:<n>`, as the SDK computes it. The routes are thin: the protocol's state and
logic are `TinkerServing`'s (serving.py); bodies that do not parse are 400s in Tinker's error shape.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response

from ..auth import User
from ..service import Service
from . import protocol as p
from .checkpoint_sharing import CheckpointSharing
from .serving import TinkerServing

PREFIX = "/api/v1"

IdempotencyKey = Annotated[str | None, Header(alias="X-Idempotency-Key", max_length=200, include_in_schema=False)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0)]


def tinker_router(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["tinker"])
    tinker = TinkerServing(service)
    sharing = CheckpointSharing(service)

    # ------------------------------------------------------------------ client set-up
    @router.post("/client/config")
    def client_config(user: User) -> dict:
        return tinker.client_config()

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
        return tinker.capabilities()

    @router.post("/create_session")
    def create_session(body: p.CreateSession, user: User) -> dict:
        return {"session_id": tinker.create_session(user, body)}

    @router.post("/session_heartbeat")
    def heartbeat(body: p.SessionRef, user: User) -> dict:
        tinker.heartbeat(user, body.session_id)
        return {}

    @router.post("/sessions/{session_id}/finish")
    def finish_session(session_id: str, user: User) -> dict:
        tinker.finish_session(user, session_id)
        return {}

    @router.get("/sessions")
    def list_sessions(user: User) -> dict:
        return {"sessions": tinker.session_ids(user)}

    @router.get("/sessions/{session_id}")
    def get_session(session_id: str, user: User) -> dict:
        return tinker.session_contents(user, session_id)

    # -------------------------------------------------------------------------- models
    @router.post("/create_model")
    def create_model(body: p.CreateModel, user: User, key: IdempotencyKey = None) -> dict:
        return tinker.create_model(user, body, key).body()

    @router.post("/get_info")
    def get_info(body: p.ModelRef, user: User) -> dict:
        return tinker.model_info(user, body.model_id)

    # ------------------------------------------------------------------------ training
    @router.post("/forward_backward")
    async def forward_backward(request: Request, user: User, key: IdempotencyKey = None) -> dict:
        raw = await request.body()
        return (await tinker.forward_backward(user, raw, request.headers.get("content-encoding"), key)).body()

    @router.post("/optim_step")
    async def optim_step(body: p.OptimStep, user: User, key: IdempotencyKey = None) -> dict:
        return (await tinker.optim_step(user, body, key)).body()

    @router.post("/save_weights")
    async def save_weights(body: p.SaveWeights, user: User, key: IdempotencyKey = None) -> dict:
        return (await tinker.save_weights(user, body, key)).body()

    @router.post("/save_weights_for_sampler")
    async def save_weights_for_sampler(body: p.SaveWeightsForSampler, user: User, key: IdempotencyKey = None) -> dict:
        return (await tinker.save_weights_for_sampler(user, body, key)).body()

    @router.post("/save_weights_external")
    async def save_weights_external(body: p.SaveWeightsExternal, user: User, key: IdempotencyKey = None) -> dict:
        return (await tinker.save_weights_external(user, body, key)).body()

    @router.post("/load_weights")
    async def load_weights(body: p.LoadWeights, user: User, key: IdempotencyKey = None) -> dict:
        return (await tinker.load_weights(user, body, key)).body()

    # ------------------------------------------------------------------------ sampling
    @router.post("/create_sampling_session")
    def create_sampling_session(body: p.CreateSamplingSession, user: User) -> dict:
        return {"sampling_session_id": tinker.create_sampling_session(user, body)}

    @router.get("/samplers/{sampler_id}")
    def get_sampler(sampler_id: str, user: User) -> dict:
        return tinker.sampler(user, sampler_id)

    @router.post("/asample")
    def asample(body: p.ASample, user: User, key: IdempotencyKey = None) -> dict:
        return tinker.sample(user, body, key).body()

    # ------------------------------------------------------------------------- futures
    @router.post("/retrieve_future")
    async def retrieve_future(body: p.RetrieveFuture, user: User) -> Response:
        return await tinker.retrieve(user, body.request_id)

    # ---------------------------------------------------------- checkpoints (RestClient)
    @router.get("/training_runs")
    def list_training_runs(user: User, limit: Limit = 20, offset: Offset = 0) -> dict:
        return tinker.training_runs(user, limit, offset)

    @router.get("/training_runs/{run_id}")
    def get_training_run(run_id: str, user: User) -> dict:
        return tinker.training_run(user, run_id)

    @router.get("/training_runs/{run_id}/checkpoints")
    def list_checkpoints(run_id: str, user: User) -> dict:
        return tinker.run_checkpoints(user, run_id)

    @router.get("/checkpoints")
    def list_user_checkpoints(user: User, limit: Limit = 100, offset: Offset = 0) -> dict:
        return tinker.user_checkpoints(user, limit, offset)

    # Routes that end in a fixed word come before the bare DELETE, whose {checkpoint:path} would
    # take 'weights/x/publish' whole.
    @router.get("/training_runs/{run_id}/checkpoints/{checkpoint:path}/archive")
    def checkpoint_archive(run_id: str, checkpoint: str, user: User, request: Request) -> Response:
        """A signed URL of the checkpoint's PEFT adapter as a tar (JSON {url, expires}, or a 302)."""
        return sharing.archive_url(user, run_id, checkpoint, request)

    @router.get("/training_runs/{run_id}/checkpoints/{checkpoint:path}/external_weights_urls")
    def external_weights_urls(run_id: str, checkpoint: str, user: User, request: Request) -> dict:
        return sharing.external_weights_urls(user, run_id, checkpoint, request)

    @router.post("/training_runs/{run_id}/checkpoints/{checkpoint:path}/publish", status_code=204)
    def publish(run_id: str, checkpoint: str, user: User) -> None:
        sharing.publish(user, run_id, checkpoint, True)

    @router.delete("/training_runs/{run_id}/checkpoints/{checkpoint:path}/publish", status_code=204)
    def unpublish(run_id: str, checkpoint: str, user: User) -> None:
        sharing.publish(user, run_id, checkpoint, False)

    @router.put("/training_runs/{run_id}/checkpoints/{checkpoint:path}/ttl", status_code=204)
    def set_checkpoint_ttl(run_id: str, checkpoint: str, body: p.CheckpointTtl, user: User) -> None:
        sharing.set_ttl(user, run_id, checkpoint, body.ttl_seconds)

    @router.delete("/training_runs/{run_id}/checkpoints/{checkpoint:path}")
    def delete_checkpoint(run_id: str, checkpoint: str, user: User) -> dict:
        tinker.delete_checkpoint(user, run_id, checkpoint)
        return {}

    @router.post("/weights_info")
    def weights_info(body: p.WeightsInfo, user: User) -> dict:
        return tinker.weights_info(user, body.tinker_path)

    return router
