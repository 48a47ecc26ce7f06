"""The EZTinker REST API (`/health`, `/v1/...`): routes only. Each parses its request, calls the
shared service and answers in this protocol's shapes; errors become FastAPI-style
`{"detail": ...}` bodies (see `app.py`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response

from ..types import (
    CreateRunRequest,
    ForwardBackwardRequest,
    HealthInfo,
    JobInfo,
    JobRef,
    LoadRequest,
    OptimStepRequest,
    RunInfo,
    RunMetrics,
    SampleRequest,
    SaveRequest,
    ScoreRequest,
)
from .archive import adapter_archive
from .auth import MaybeUser, User
from .records import JobRecord
from .service import Service

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Retries with the same key return the original job instead of repeating it.",
    ),
]
MAX_WAIT_SECONDS = 60.0


def job_response(record: JobRecord) -> Response:
    """A job as JSON, its stored result spliced in as the worker encoded it: a large sample
    result is never decoded and re-encoded per poll."""
    head = record.info(with_result=False).model_dump_json(exclude={"result"})
    body = head[:-1] + ',"result":' + (record.result_json or "null") + "}"
    return Response(body, media_type="application/json")


def rest_router(service: Service) -> APIRouter:
    router = APIRouter()

    # Routes that only touch SQLite or do light validation are plain functions: FastAPI runs
    # them in its thread pool, off the event loop. Those that wait on a job are coroutines.
    @router.get(
        "/health",
        response_model=HealthInfo,
        response_model_exclude_none=True,
        tags=["service"],
        summary="Liveness; the models, runs and queue too for a valid key (or with no keys configured)",
        responses={503: {"model": HealthInfo, "description": "The job worker has stopped."}},
    )
    def health(user: MaybeUser) -> HealthInfo | Response:
        info = service.health()
        # alive, but no job will ever run: not healthy
        stopped = info.worker is not None and info.worker.startswith("stopped")
        if user is None:
            # Probes need no key, but the rest (model paths, every user's run count) is not theirs to see.
            info = HealthInfo(status=info.status)
        if stopped:
            return Response(info.model_dump_json(exclude_none=True), status_code=503, media_type="application/json")
        return info

    @router.get("/v1/info", tags=["service"], summary="Base models, vocabularies and request limits")
    def info(user: User) -> dict:
        return service.info()

    @router.get("/v1/tokenizer", tags=["service"], summary="A base model's tokenizer files, for client-side rendering")
    def tokenizer_files(
        user: User, model: Annotated[str | None, Query(description="Base model (default: the first).")] = None
    ) -> dict:
        return service.tokenizer_files(model)

    # ------------------------------------------------------------------------------ runs
    @router.post("/v1/runs", response_model=RunInfo, status_code=201, tags=["runs"])
    async def create_run(request: CreateRunRequest, user: User, key: IdempotencyKey = None) -> RunInfo:
        return await service.create_run(user, request, key)

    @router.get("/v1/runs", response_model=list[RunInfo], tags=["runs"])
    def list_runs(user: User) -> list[RunInfo]:
        return service.list_runs(user)

    @router.get("/v1/runs/{run_id}", response_model=RunInfo, tags=["runs"])
    def get_run(run_id: str, user: User) -> RunInfo:
        return service.get_run(user, run_id)

    @router.get(
        "/v1/runs/{run_id}/metrics",
        response_model=RunMetrics,
        tags=["runs"],
        summary="The run's training curve: loss, tokens, grad norm and learning rate per optimizer step",
    )
    def run_metrics(run_id: str, user: User) -> RunMetrics:
        return service.run_metrics(user, run_id)

    @router.get(
        "/v1/runs/{run_id}/jobs",
        response_model=list[JobInfo],
        tags=["runs"],
        summary="The run's queued and running jobs, then its newest finished ones (results left out)",
    )
    def run_jobs(
        run_id: str,
        user: User,
        limit: Annotated[int, Query(ge=1, le=200, description="Finished jobs to list at most.")] = 20,
    ) -> list[JobInfo]:
        return service.run_jobs(user, run_id, limit)

    @router.delete("/v1/runs/{run_id}", tags=["runs"])
    async def delete_run(run_id: str, user: User) -> dict:
        await service.delete_run(user, run_id)
        return {"deleted": run_id}

    # ----------------------------------------------------------------------- model work
    @router.post("/v1/runs/{run_id}/forward_backward", response_model=JobRef, status_code=202, tags=["training"])
    def forward_backward(run_id: str, request: ForwardBackwardRequest, user: User, key: IdempotencyKey = None):
        return service.submit_forward_backward(user, run_id, request, key)

    @router.post(
        "/v1/runs/{run_id}/forward",
        response_model=JobRef,
        status_code=202,
        tags=["training"],
        summary="The loss and every target token's logprob, without a gradient",
    )
    def forward(run_id: str, request: ForwardBackwardRequest, user: User, key: IdempotencyKey = None):
        return service.submit_forward_backward(user, run_id, request, key, forward_only=True, all_logprobs=True)

    @router.post("/v1/runs/{run_id}/optim_step", response_model=JobRef, status_code=202, tags=["training"])
    def optim_step(run_id: str, request: OptimStepRequest, user: User, key: IdempotencyKey = None):
        return service.submit_optim_step(user, run_id, request, key)

    @router.post("/v1/runs/{run_id}/sample", response_model=JobRef, status_code=202, tags=["sampling"])
    def sample_run(run_id: str, request: SampleRequest, user: User, key: IdempotencyKey = None):
        return service.submit_sample(user, run_id, request, key)

    @router.post(
        "/v1/sample", response_model=JobRef, status_code=202, tags=["sampling"], summary="Sample from a bare base model"
    )
    def sample_base(request: SampleRequest, user: User, key: IdempotencyKey = None):
        return service.submit_sample(user, None, request, key)

    @router.post(
        "/v1/runs/{run_id}/evaluate",
        response_model=JobRef,
        status_code=202,
        tags=["sampling"],
        summary="Score responses: mean and summed logprob of each response's tokens",
    )
    def score(run_id: str, request: ScoreRequest, user: User, key: IdempotencyKey = None):
        return service.submit_score(user, run_id, request, key)

    @router.post("/v1/runs/{run_id}/save", response_model=JobRef, status_code=202, tags=["checkpoints"])
    def save(run_id: str, request: SaveRequest, user: User, key: IdempotencyKey = None):
        return service.submit_save(user, run_id, request, key)

    @router.post("/v1/runs/{run_id}/load", response_model=JobRef, status_code=202, tags=["checkpoints"])
    def load(run_id: str, request: LoadRequest, user: User, key: IdempotencyKey = None):
        return service.submit_load(user, run_id, request, key)

    @router.get(
        "/v1/runs/{run_id}/checkpoints/{name}/adapter",
        tags=["checkpoints"],
        summary="Download a checkpoint's PEFT adapter as a tar (peft.PeftModel.from_pretrained loads it)",
        response_class=Response,
        responses={200: {"content": {"application/x-tar": {}}}},
    )
    def download_adapter(run_id: str, name: str, user: User) -> Response:
        path, ref = service.checkpoint_path(user, f"{run_id}/{name}")
        return adapter_archive(path, ref)

    # ------------------------------------------------------------------------------ jobs
    @router.get("/v1/jobs/{job_id}", response_model=JobInfo, tags=["jobs"])
    async def get_job(
        job_id: str,
        user: User,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description="Long-poll up to this many seconds.")] = 0,
    ) -> Response:
        return job_response(await service.wait_job(user, job_id, wait))

    return router
