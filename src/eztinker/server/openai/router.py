"""The OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`, `/v1/completions`) beside the
REST API, on the same service, keys and ownership: the official `openai` client works unmodified.

A `model` is a base model (the bare weights), a run id (its live adapter), `<run_id>/<checkpoint>`
or `tinker://<run_id>/sampler_weights/<name>` (a saved checkpoint: a fixed snapshot, whatever its
run does next). Another user's runs and checkpoints do not exist for the caller. A request becomes
one Sample job, batched with the other samples queued beside it (other requests, other adapters);
`stream: true` answers server-sent events as the sampler decodes, token by token. Errors are
OpenAI's `{"error": {"message", "type", "param", "code"}}`. The routes are thin: the protocol's
logic is `OpenAIServing`'s (serving.py), each request's answer a `SampleAnswer`'s (answers.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..auth import User
from ..service import Service
from . import protocol as p
from .answers import Target
from .errors import OpenAIError, error_body, from_service_error
from .serving import OpenAIServing

PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/tokenizer_info")

__all__ = ["OpenAIError", "Target", "error_body", "from_service_error", "openai_router", "owns"]


def owns(path: str) -> bool:
    return path in PATHS or path.startswith("/v1/models/")


def openai_router(service: Service) -> APIRouter:
    router = APIRouter(tags=["openai"])
    openai = OpenAIServing(service)

    @router.get("/v1/models", response_model=p.ModelList, summary="Base models, your runs and their checkpoints")
    def list_models(user: User) -> p.ModelList:
        return p.ModelList(data=openai.models_of(user))

    @router.get("/v1/models/{model:path}", response_model=p.Model)
    def get_model(model: str, user: User) -> p.Model:
        return openai.model(user, model)

    @router.post("/v1/chat/completions", response_model=p.ChatCompletion)
    async def chat_completions(body: p.ChatCompletionRequest, user: User, request: Request):
        return await openai.chat_completions(body, user, request)

    @router.post("/v1/completions", response_model=p.Completion)
    async def completions(body: p.CompletionRequest, user: User, request: Request):
        return await openai.completions(body, user, request)

    from .tokenizer import add_tokenizer_routes  # vLLM's /tokenize and the like

    add_tokenizer_routes(router, service, openai.resolve)
    return router
