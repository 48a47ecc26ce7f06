"""HTTP routes only: parse, authenticate, hand to the service, map its errors to status codes."""


import gc
import hmac
import logging
import math
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse

from .. import __version__
from ..types import (
    CreateRunRequest,
    ForwardBackwardRequest,
    HealthInfo,
    JobInfo,
    JobRef,
    LoadRequest,
    OptimStepRequest,
    RunInfo,
    SampleRequest,
    SaveRequest,
    ScoreRequest,
)
from .service import Service, ServiceError

log = logging.getLogger(__name__)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Retries with the same key return the original job instead of repeating it.",
    ),
]
MAX_WAIT_SECONDS = 60.0
_GZIP_MIN_BYTES = 16 * 1024  # smaller responses are not worth compressing


def create_app(service: Service) -> FastAPI:
    keys = service.settings.user_keys()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.ensure_started()
        # A full garbage collection walks every object torch and transformers create at start-up
        # (~400k: 0.15-0.4 s on the 2-core CI machine) holding the GIL, stalling /health and job
        # submissions for 100+ ms under load. Those objects live as long as the server: freeze them.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            service.close()

    app = FastAPI(
        title="EZTinker",
        version=__version__,
        description="LoRA fine-tuning service: training runs share one base model; every model "
        "operation is a job: submit, get a job id at once, then wait on `GET /v1/jobs/{job_id}`.",
        lifespan=lifespan,
    )
    app.state.service = service
    # Large responses (sampled tokens and logprobs) are gzipped for clients that ask; level 1
    # compresses about 2x at ~30 MB/s on one core, which keeps the event loop responsive. Added
    # first, so it is the innermost middleware and sees whole responses (minimum_size applies).
    app.add_middleware(GZipMiddleware, minimum_size=_GZIP_MIN_BYTES, compresslevel=1)
    if service.settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=service.settings.cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        limit = service.settings.max_request_bytes
        # str.isdigit() accepts non-ASCII digits ("²") that int() refuses, which would be a 500.
        if length is not None and not (length.isascii() and length.isdigit()):
            return JSONResponse(status_code=400, content={"detail": f"invalid Content-Length {length!r}"})
        if length is not None and int(length) > limit:
            return JSONResponse(
                status_code=413,
                content={"detail": f"request body of {length} bytes exceeds max_request_bytes ({limit})"},
            )
        return await call_next(request)

    # The Content-Length check above never sees a chunked upload (no Content-Length); without this,
    # such a body would be read whole, however large, before anything (auth included) looks at it.
    app.add_middleware(_StreamedBodyLimit, limit=service.settings.max_request_bytes)

    # FastAPI's default 422 handler echoes each offending input back; a NaN/Infinity in the JSON
    # (Python's json emits them) makes that echo unserialisable, turning a correct rejection into
    # a 500. Same response, with non-finite numbers spelt as strings.
    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"detail": _finite(jsonable_encoder(exc.errors()))})

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError):
        if exc.status == 422 and exc.loc:
            detail = [{"loc": list(exc.loc), "msg": exc.message, "type": "value_error"}]
        else:
            detail = exc.message
        return JSONResponse(status_code=exc.status, content={"detail": _finite(detail)})

    def current_user(
        authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
        x_api_key: Annotated[str | None, Header(alias="X-API-Key", include_in_schema=False)] = None,
    ) -> str:
        if not keys:
            return "default"
        # The auth scheme is case-insensitive (RFC 7235), so "bearer <key>" is accepted too.
        given = x_api_key or (authorization[7:] if authorization and authorization[:7].lower() == "bearer " else "")
        user = None
        for key, name in keys.items():  # compare against every key: constant time, no early exit
            if hmac.compare_digest(key.encode(), given.encode()):
                user = name
        if user is None:
            raise ServiceError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        return user

    User = Annotated[str, Depends(current_user)]

    @app.get("/health", response_model=HealthInfo, tags=["service"])
    def health() -> HealthInfo:
        return service.health()

    @app.get("/v1/info", tags=["service"], summary="Model, vocabulary and request limits")
    def info(user: User) -> dict:
        return service.info()

    @app.get("/v1/tokenizer", tags=["service"], summary="The model's tokenizer files, for client-side rendering")
    async def tokenizer_files(user: User) -> dict:
        return await run_in_threadpool(_tokenizer_files, service)

    # ------------------------------------------------------------------------------ runs
    @app.post("/v1/runs", response_model=RunInfo, status_code=201, tags=["runs"])
    async def create_run(request: CreateRunRequest, user: User, key: IdempotencyKey = None) -> RunInfo:
        return await service.create_run(user, request, key)

    @app.get("/v1/runs", response_model=list[RunInfo], tags=["runs"])
    def list_runs(user: User) -> list[RunInfo]:
        return service.list_runs(user)

    @app.get("/v1/runs/{run_id}", response_model=RunInfo, tags=["runs"])
    def get_run(run_id: str, user: User) -> RunInfo:
        return service.get_run(user, run_id)

    @app.delete("/v1/runs/{run_id}", tags=["runs"])
    async def delete_run(run_id: str, user: User) -> dict:
        await service.delete_run(user, run_id)
        return {"deleted": run_id}

    # ----------------------------------------------------------------------- model work
    @app.post("/v1/runs/{run_id}/forward_backward", response_model=JobRef, status_code=202, tags=["training"])
    async def forward_backward(run_id: str, request: ForwardBackwardRequest, user: User, key: IdempotencyKey = None):
        return await run_in_threadpool(service.submit_forward_backward, user, run_id, request, key)

    @app.post("/v1/runs/{run_id}/optim_step", response_model=JobRef, status_code=202, tags=["training"])
    def optim_step(run_id: str, request: OptimStepRequest, user: User, key: IdempotencyKey = None):
        return service.submit_optim_step(user, run_id, request, key)

    @app.post("/v1/runs/{run_id}/sample", response_model=JobRef, status_code=202, tags=["sampling"])
    async def sample_run(run_id: str, request: SampleRequest, user: User, key: IdempotencyKey = None):
        return await run_in_threadpool(service.submit_sample, user, run_id, request, key)

    @app.post("/v1/sample", response_model=JobRef, status_code=202, tags=["sampling"], summary="Sample from the bare base model")
    async def sample_base(request: SampleRequest, user: User, key: IdempotencyKey = None):
        return await run_in_threadpool(service.submit_sample, user, None, request, key)

    @app.post("/v1/runs/{run_id}/evaluate", response_model=JobRef, status_code=202, tags=["sampling"],
              summary="Score responses: mean and summed logprob of each response's tokens")
    async def evaluate(run_id: str, request: ScoreRequest, user: User, key: IdempotencyKey = None):
        return await run_in_threadpool(service.submit_score, user, run_id, request, key)

    @app.post("/v1/runs/{run_id}/save", response_model=JobRef, status_code=202, tags=["checkpoints"])
    def save(run_id: str, request: SaveRequest, user: User, key: IdempotencyKey = None):
        return service.submit_save(user, run_id, request, key)

    @app.post("/v1/runs/{run_id}/load", response_model=JobRef, status_code=202, tags=["checkpoints"])
    def load(run_id: str, request: LoadRequest, user: User, key: IdempotencyKey = None):
        return service.submit_load(user, run_id, request, key)

    # ------------------------------------------------------------------------------ jobs
    @app.get("/v1/jobs/{job_id}", response_model=JobInfo, tags=["jobs"])
    async def get_job(
        job_id: str,
        user: User,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description="Long-poll up to this many seconds.")] = 0,
    ) -> JobInfo:
        return await service.wait_job(user, job_id, wait)

    return app


def _finite(value):
    """JSON-able `value` with NaN/Infinity floats replaced by their names ('nan', 'inf'), and
    lone UTF-16 surrogates in strings spelt as escapes ('\\ud800')."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    # A lone surrogate ("\ud800" is valid JSON) echoed back in a 422 would make the response
    # body unencodable as UTF-8, turning a correct rejection into a 500.
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class _StreamedBodyLimit:
    """Pure ASGI middleware for bodies without a Content-Length (chunked uploads): reads the
    body up to `limit` bytes, answers 413 past that, else hands the app the buffered body.
    (FastAPI reads the whole body into memory anyway; this only caps it.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or any(name == b"content-length" for name, _ in scope["headers"]):
            return await self.app(scope, receive, send)  # the Content-Length check applies
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                response = JSONResponse(
                    status_code=413,
                    content={"detail": f"request body exceeds max_request_bytes ({self.limit})"},
                )
                return await response(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)


def _tokenizer_files(service: Service) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        service.tokenizer.save_pretrained(tmp)
        return {
            "model": service.base.name,
            "files": {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()},
        }
