"""The FastAPI application: middleware, authentication and one router per protocol over one
shared service. A protocol is a module beside `rest.py` that adds its router and its own error
mapping here; runs, jobs, checkpoints, auth, ownership and idempotency are the service's."""

import gc
import logging
import math
import sqlite3
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .auth import User
from .downloads import downloads_router
from .evaluations import evaluations_router
from .guards import HostCheck, SecurityHeaders
from .openai import router as openai
from .rest import rest_router
from .service import LimitExceeded, Service, ServiceError
from .store import BUSY_TIMEOUT_SECONDS, is_busy
from .ui import DOCS, mount_api_docs, mount_dashboard
from .ui import PREFIX as UI_PREFIX

log = logging.getLogger(__name__)

_GZIP_MIN_BYTES = 16 * 1024  # smaller responses are not worth compressing


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
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
        description="LoRA fine-tuning service: training runs share their base model's weights; every model "
        "operation is a job: submit, get a job id at once, then wait on `GET /v1/jobs/{job_id}`.",
        lifespan=lifespan,
        docs_url=None,  # mount_api_docs serves Swagger UI from the package, not a CDN
        redoc_url=None,
    )
    app.state.user_keys = service.settings.user_keys()
    # Large responses (sampled tokens and logprobs) are gzipped for clients that ask; level 1
    # compresses about 2x at ~30 MB/s on one core, which keeps the event loop responsive. Added
    # first, so it is the innermost middleware and sees whole responses (minimum_size applies).
    app.add_middleware(GZipMiddleware, minimum_size=_GZIP_MIN_BYTES, compresslevel=1)
    if service.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=service.settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )

    tinker = _tinker_protocol()

    def protocol_error(path: str, status: int, message: str) -> JSONResponse:
        """An error raised outside any route (body limits, a busy database), in the shape of
        the protocol the path belongs to."""
        if tinker is not None and path.startswith(tinker.prefix):
            return tinker.error_body(status, message)
        if openai.owns(path):
            return openai.error_body(status, message)
        return JSONResponse(status_code=status, content={"detail": message})

    app.add_middleware(_BodyLimit, limit=service.settings.max_request_bytes, error=protocol_error)
    app.add_middleware(SecurityHeaders, page_prefixes=(UI_PREFIX + "/", DOCS))
    if not app.state.user_keys:  # outermost: a refused Host reaches nothing else
        app.add_middleware(HostCheck, allowed=service.settings.allowed_hosts, error=protocol_error)

    # FastAPI's default 422 handler echoes each offending input back; a NaN/Infinity in the JSON
    # (Python's json emits them) makes that echo unserialisable, turning a correct rejection into
    # a 500. Same response, with non-finite numbers spelt as strings.

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = _finite(jsonable_encoder(exc.errors()))
        first: dict[str, Any]
        if openai.owns(request.url.path):
            first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
            where = ".".join(str(part) for part in first["loc"] if part != "body")
            return openai.error_body(400, f"{where}: {first['msg']}" if where else first["msg"], where or None)
        if tinker is not None and tinker.owns(request):
            first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
            where = ".".join(str(part) for part in first["loc"] if part != "body")
            return tinker.error_body(400, f"{where}: {first['msg']}" if where else first["msg"], tuple(first["loc"]))
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        response = _service_error(request, exc)
        if isinstance(exc, LimitExceeded):
            # Every SDK here retries a 429; one that waiting cannot clear says not to (the header
            # the Tinker and OpenAI SDKs obey), one that can says when.
            response.headers.update({"Retry-After": "1"} if exc.clears else {"X-Should-Retry": "false"})
        return response

    def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if openai.owns(request.url.path):
            error = openai.from_service_error(exc)
            return openai.error_body(error.status, _finite(error.message), error.param, error.code)
        if tinker is not None and tinker.owns(request):
            return tinker.error_body(exc.status, _finite(exc.message), exc.loc)
        if exc.status == 422 and exc.loc is not None:
            loc = list(exc.loc) if exc.loc[:1] in (("query",), ("path",)) else ["body", *exc.loc]
            detail: list[dict[str, Any]] | str = [{"loc": loc, "msg": exc.message, "type": "value_error"}]
        else:
            detail = exc.message
        return JSONResponse(status_code=exc.status, content={"detail": _finite(detail)})

    @app.exception_handler(openai.OpenAIError)
    async def openai_error(_: Request, exc: openai.OpenAIError):
        response = openai.error_body(exc.status, _finite(exc.message), exc.param, exc.code)
        response.headers.update(exc.headers)
        return response

    # Another process holding the database's write lock (an operator's sqlite3 shell, a backup)
    # makes a write wait BUSY_TIMEOUT_SECONDS, then raise: a 503 the SDKs retry, not a plain 500.
    @app.exception_handler(sqlite3.OperationalError)
    async def database_busy(request: Request, exc: sqlite3.OperationalError):
        if not is_busy(exc):
            raise exc
        message = "the database is locked by another process; retry shortly"
        response = protocol_error(request.url.path, 503, message)
        response.headers["Retry-After"] = str(math.ceil(BUSY_TIMEOUT_SECONDS))
        return response

    # FastAPI's own errors (a body that does not parse, a method not allowed) in the path's shape.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        response = protocol_error(request.url.path, exc.status_code, str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    app.include_router(rest_router(service))
    app.include_router(downloads_router(service))
    app.include_router(evaluations_router(service))
    app.include_router(openai.openai_router(service))

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics: jobs, queue depth, latencies, tokens, runs")
    def metrics(user: User) -> Response:
        body, content_type = service.metrics_exposition()
        return Response(body, media_type=content_type)

    mount_dashboard(app)
    mount_api_docs(app)
    if tinker is not None:
        app.include_router(tinker.router(service))

        @app.exception_handler(tinker.WireError)
        async def wire_error(_: Request, exc):
            return tinker.error_body(exc.status, _finite(exc.message), exc.loc)

    return app


class _TinkerProtocol:
    """The Tinker router and its error mapping, when the `tinker` package is installed (its
    protobuf messages are the wire format): `pip install 'eztinker[tinker]'`."""

    def __init__(self):
        from .tinker import router, serving, wire

        self.router, self.error_body, self.WireError = router.tinker_router, serving.error_body, wire.WireError
        self.prefix = router.PREFIX + "/"

    def owns(self, request: Request) -> bool:
        return request.url.path.startswith(self.prefix)


def _tinker_protocol() -> _TinkerProtocol | None:
    try:
        return _TinkerProtocol()
    except ImportError as exc:
        log.info("the Tinker API is off (%s); install it with: pip install 'eztinker[tinker]'", exc)
        return None


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


class _BodyLimit:
    """Pure ASGI middleware capping request bodies at `limit` bytes (413), by their Content-Length
    or, for chunked uploads without one, by reading the body up to the limit and handing the app
    the buffered body. (FastAPI reads the whole body into memory anyway; this only caps it, and
    it runs before anything, authentication included, looks at the body.) Not an
    `@app.middleware("http")`: that wraps every request in extra tasks and streams, about a
    third of the event loop's time per small SDK round trip."""

    def __init__(self, app, limit: int, error):
        self.app, self.limit, self.error = app, limit, error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if length is not None:
            # bytes.isdigit() is ASCII-only: "²" and the like are refused, not a 500 from int().
            if not length.isdigit():
                response = self.error(scope["path"], 400, f"invalid Content-Length {length.decode('latin-1')!r}")
            elif int(length) > self.limit:
                response = self.error(
                    scope["path"], 413, f"request body of {int(length)} bytes exceeds max_request_bytes ({self.limit})"
                )
            else:
                return await self.app(scope, receive, send)
            return await response(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                response = self.error(scope["path"], 413, f"request body exceeds max_request_bytes ({self.limit})")
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
