"""The served models' tokenizers over HTTP, as vLLM's OpenAI server offers them: `POST /tokenize`,
`POST /detokenize` and `GET /tokenizer_info`. lm-eval's `local-completions` looks for exactly these
(`tokenizer_backend=remote`, picked automatically when they answer), so it runs against this
server with only a base URL and a model name: no tokenizer folder on the client's disk.

`model` is optional (lm-eval sends none): without it, the server's default base model. A run or a
checkpoint name means its base model's tokenizer. The tokenizer is the one the server hands to
clients (`GET /v1/tokenizer`), loaded once per model.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from ..auth import User
from ..service import Service
from .answers import Target
from .errors import OpenAIError
from .protocol import ChatMessageIn, _Body

PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


class TokenizeRequest(_Body):
    model: str | None = Field(None, max_length=1000, description="Default: the server's default base model.")
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = Field(None, description="Rendered with the model's chat template.")
    add_special_tokens: bool = Field(True, description="The tokenizer's own (e.g. a BOS token); Qwen2 adds none.")
    add_generation_prompt: bool = Field(True, description="messages: end with the assistant's turn opening.")
    return_token_strs: bool = False


class TokenizeResponse(_Body):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    model: str | None = Field(None, max_length=1000)
    tokens: list[int]


class DetokenizeResponse(_Body):
    prompt: str


class TokenizerInfo(_Body):
    model: str
    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    max_model_len: int


class _Tokenizers:
    """Each base model's tokenizer, loaded on first use from the files the server serves."""

    def __init__(self, service: Service):
        self.service, self._lock = service, threading.Lock()
        self._loaded: dict[str, Any] = {}

    def __call__(self, model: str) -> Any:
        with self._lock:
            if model not in self._loaded:
                from transformers import AutoTokenizer

                with tempfile.TemporaryDirectory() as folder:
                    for name, text in self.service.tokenizer_files(model)["files"].items():
                        (Path(folder) / name).write_text(text)
                    self._loaded[model] = AutoTokenizer.from_pretrained(folder)
            return self._loaded[model]


def add_tokenizer_routes(router: APIRouter, service: Service, resolve: Callable[[str, str], Target]) -> None:
    tokenizers = _Tokenizers(service)

    def base_model(user: str, name: str | None) -> str:
        return service.default_model if name is None else resolve(user, name).base_model

    @router.post("/tokenize", response_model=TokenizeResponse, tags=["tokenizer"], summary="Text or chat -> token ids")
    async def tokenize(body: TokenizeRequest, user: User) -> TokenizeResponse:
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "give exactly one of prompt and messages", "prompt")

        def work() -> TokenizeResponse:
            model = base_model(user, body.model)
            tokenizer = tokenizers(model)
            if body.prompt is not None:
                tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            else:
                assert body.messages is not None  # exactly one of prompt and messages, checked above
                messages = [
                    {
                        "role": m.role,
                        "content": m.content
                        if isinstance(m.content, str)
                        else "".join(part.text or "" for part in m.content or []),
                    }
                    for m in body.messages
                ]
                try:
                    tokens = tokenizer.apply_chat_template(
                        messages, add_generation_prompt=body.add_generation_prompt, tokenize=True, return_dict=True
                    )["input_ids"]
                except Exception as exc:  # the template refuses a role or an order of turns
                    raise OpenAIError(
                        400, f"messages: the chat template cannot render them: {exc}", "messages"
                    ) from None
            strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
            return TokenizeResponse(
                count=len(tokens),
                max_model_len=service.models[model].max_context_length,
                tokens=tokens,
                token_strs=strs,
            )

        return await run_in_threadpool(work)

    @router.post("/detokenize", response_model=DetokenizeResponse, tags=["tokenizer"], summary="Token ids -> text")
    async def detokenize(body: DetokenizeRequest, user: User) -> DetokenizeResponse:
        def work() -> DetokenizeResponse:
            model = base_model(user, body.model)
            vocab = service.models[model].vocab_size
            for position, token in enumerate(body.tokens):
                if not 0 <= token < vocab:
                    raise OpenAIError(
                        400, f"tokens[{position}]: token id {token} is outside the vocabulary [0, {vocab})", "tokens"
                    )
            return DetokenizeResponse(prompt=tokenizers(model).decode(body.tokens))

        return await run_in_threadpool(work)

    @router.get(
        "/tokenizer_info",
        response_model=TokenizerInfo,
        tags=["tokenizer"],
        summary="The tokenizer's special tokens and chat template",
    )
    async def tokenizer_info(user: User, model: str | None = Query(None, max_length=1000)) -> TokenizerInfo:
        def work() -> TokenizerInfo:
            name = base_model(user, model)
            tokenizer = tokenizers(name)
            template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
            return TokenizerInfo(
                model=name,
                tokenizer_class=type(tokenizer).__name__,
                eos_token=tokenizer.eos_token,
                bos_token=tokenizer.bos_token,
                pad_token=tokenizer.pad_token,
                unk_token=tokenizer.unk_token,
                chat_template=template,
                max_model_len=service.models[name].max_context_length,
            )

        return await run_in_threadpool(work)
