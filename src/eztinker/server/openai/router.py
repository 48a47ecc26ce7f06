"""The OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`, `/v1/completions`) beside the
REST API, on the same service, keys and ownership: the official `openai` client works unmodified.

A `model` is a base model (the bare weights), a run id (its live adapter), `<run_id>/<checkpoint>`
or `tinker://<run_id>/sampler_weights/<name>` (a saved checkpoint: a fixed snapshot, whatever its
run does next). Another user's runs and checkpoints do not exist for the caller. A request becomes
one Sample job, batched with the other samples queued beside it (other requests, other adapters);
`stream: true` answers server-sent events as the sampler decodes, token by token. Errors are
OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ...types import ChatMessage, Prompt, SampledToken, SamplingParams, parse_checkpoint_ref
from ..auth import User
from ..records import JobRecord
from ..service import Service, ServiceError
from ..tinker.protocol import parse_tinker_path
from . import protocol as p

log = logging.getLogger(__name__)

PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/tokenizer_info")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def owns(path: str) -> bool:
    return path in PATHS or path.startswith("/v1/models/")


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers: dict[str, str] = {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    # OpenAI's own 429s are {"type": "requests" | "tokens", "code": "rate_limit_exceeded"}.
    kind = "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
    if code is None:
        code = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}.get(status)
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}}
    )


def from_service_error(exc: ServiceError, names: dict[str, str] | None = None) -> OpenAIError:
    """The service's refusal in OpenAI's terms: its 422s are 400s naming the OpenAI parameter."""
    status = 400 if exc.status == 422 else exc.status
    param = None
    if exc.loc:
        key = str(exc.loc[1]) if exc.loc[0] == "sampling_params" and len(exc.loc) > 1 else str(exc.loc[0])
        param = (names or {}).get(key, _PARAMS.get(key, key))
    error = OpenAIError(status, exc.message, param)
    clears = getattr(exc, "clears", None)  # a per-user limit (service.LimitExceeded)
    if clears is not None:
        error.headers = {"Retry-After": "1"} if clears else {"X-Should-Retry": "false"}
    return error


_PARAMS = {
    "num_samples": "n",
    "max_tokens": "max_tokens",
    "seed": "seed",
    "stop": "stop",
    "temperature": "temperature",
    "top_p": "top_p",
}


@dataclass
class Target:
    """What a `model` name samples from."""

    name: str
    base_model: str
    run_id: str | None = None
    snapshot: Path | None = None


@dataclass
class _Choice:
    """One candidate being streamed: its text so far, decoded incrementally."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    done: bool = False


def openai_router(service: Service) -> APIRouter:
    router = APIRouter(tags=["openai"])

    def not_found(name: str) -> OpenAIError:
        return OpenAIError(
            404, f"The model `{name}` does not exist or you do not have access to it.", "model", "model_not_found"
        )

    def resolve(user: str, name: str) -> Target:
        if name in service.models:
            return Target(name, name)
        try:
            if name.startswith("tinker://"):
                run_id, checkpoint = parse_tinker_path(name)
                ref = f"{run_id}/{checkpoint}"
            elif "/" in name:
                run_id, checkpoint = parse_checkpoint_ref(name, default_run="")
                ref = name
            else:
                run = service.owned_run(user, name)
                return Target(name, held(run.base_model, name), run_id=name)
            path, _ = service.checkpoint_path(user, ref, field="model")
        except ValueError:
            raise not_found(name) from None
        except ServiceError as exc:
            if exc.status in (404, 422):
                raise not_found(name) from None
            raise from_service_error(exc) from None
        return Target(name, held(service.run_record(run_id).base_model, name), snapshot=path)

    def held(base_model: str, name: str) -> str:
        if base_model not in service.models:
            raise OpenAIError(
                400,
                f"model `{name}` is on base model {base_model!r}, which this server does not hold "
                f"(start it with --model {base_model})",
                "model",
                "model_not_available",
            )
        return base_model

    # --------------------------------------------------------------------------- models
    started = int(time.time())

    def models_of(user: str) -> list[p.Model]:
        models = [p.Model(id=name, created=started, owned_by="eztinker", root=name) for name in service.models]
        for run in service.list_runs(user):
            created = int(run.created_at.timestamp())
            models.append(
                p.Model(id=run.id, created=created, owned_by=user, root=run.base_model, parent=run.base_model)
            )
            for checkpoint in run.checkpoints:
                models.append(
                    p.Model(
                        id=f"{run.id}/{checkpoint.name}",
                        created=int(checkpoint.created_at.timestamp()),
                        owned_by=user,
                        root=run.base_model,
                        parent=run.base_model,
                    )
                )
        return models

    @router.get("/v1/models", response_model=p.ModelList, summary="Base models, your runs and their checkpoints")
    def list_models(user: User) -> p.ModelList:
        return p.ModelList(data=models_of(user))

    @router.get("/v1/models/{model:path}", response_model=p.Model)
    def get_model(model: str, user: User) -> p.Model:
        target = resolve(user, model)
        found = next((m for m in models_of(user) if m.id == model), None)
        if found is None:  # a tinker:// name of a checkpoint listed under its own name
            found = p.Model(id=model, created=0, owned_by=user, root=target.base_model, parent=target.base_model)
        return found

    # ------------------------------------------------------------------------- sampling
    def sampling_params(body: p._Sampling, max_tokens: int | None, max_name: str) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise OpenAIError(400, f"{name} is not supported by this server (only 0)", name)
        if body.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported by this server", "logit_bias")
        if body.seed is not None and body.seed < 0:
            raise OpenAIError(400, f"seed must be >= 0 here, got {body.seed}", "seed")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(s == "" for s in stop):
            raise OpenAIError(400, "stop strings must not be empty", "stop")
        max_tokens = max_tokens or service.settings.max_new_tokens
        if body.min_tokens is not None and body.min_tokens > max_tokens:
            raise OpenAIError(
                400, f"min_tokens ({body.min_tokens}) must not exceed {max_name} ({max_tokens})", "min_tokens"
            )
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                stop=stop,
                seed=body.seed,
                top_k=max(body.top_k or 0, 0),
                min_p=body.min_p or 0.0,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                min_tokens=body.min_tokens or 0,
                ignore_eos=bool(body.ignore_eos),
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            bad_field = str(first["loc"][0]) if first["loc"] else None
            raise OpenAIError(400, first["msg"], max_name if bad_field == "max_tokens" else bad_field) from None

    def chat_prompt(model: str, body: p.ChatCompletionRequest) -> list[int]:
        messages = []
        for i, message in enumerate(body.messages):
            role = _ROLES.get(message.role)
            if role is None:
                raise OpenAIError(
                    400,
                    f"messages[{i}].role {message.role!r} is not supported (system, developer, user, assistant)",
                    f"messages.[{i}].role",
                )
            content = message.content
            if isinstance(content, list):
                texts = [part.text for part in content if part.type == "text" and part.text is not None]
                if len(texts) != len(content):
                    raise OpenAIError(
                        400, f"messages[{i}]: only text content parts are supported", f"messages.[{i}].content"
                    )
                content = "".join(texts)
            messages.append(ChatMessage(role=role, content=content or ""))
        return service.encode_prompt(model, Prompt(messages=messages), ("messages",))

    def completion_prompts(model: str, body: p.CompletionRequest) -> list[list[int]]:  # also echo.py's
        prompt = body.prompt
        items: Sequence[str | list[int]]
        if isinstance(prompt, str):
            items = [prompt]
        elif not prompt:
            raise OpenAIError(400, "prompt must not be empty", "prompt")
        elif all(isinstance(x, int) for x in prompt):
            items = [cast(list[int], prompt)]  # one prompt of token ids
        else:
            items = cast("list[str] | list[list[int]]", prompt)
        prompts = []
        for i, item in enumerate(items):
            one = Prompt(tokens=item) if isinstance(item, list) else Prompt(text=item) if item else None
            if one is None:
                raise OpenAIError(400, f"prompt[{i}] is empty", "prompt")
            prompts.append(service.encode_prompt(model, one, ("prompt",)))
        return prompts

    def refuse_unsupported(body: p._Sampling, names: dict) -> None:
        for name, unsupported in names.items():
            if unsupported(getattr(body, name, None)):
                raise OpenAIError(400, f"{name} is not supported by this server", name)

    def submit(
        user: str,
        body: p._Sampling,
        prompts_of: Callable[[str], list[list[int]]],
        max_tokens: int | None,
        max_name: str,
        top: int,
        progress,
    ) -> tuple[Target, list[list[int]], SamplingParams, str]:
        """Validate and queue the sample (a thread-pool thread: tokenizer and database work)."""
        target = resolve(user, body.model)
        params = sampling_params(body, max_tokens, max_name)
        try:
            prompts = prompts_of(target.base_model)
            ref = service.submit_sample_tokens(
                user,
                target.base_model,
                target.run_id if target.snapshot is None else None,
                prompts,
                body.n,
                params,
                body,
                None,
                snapshot=target.snapshot,
                topk_logprobs=top,
                progress=progress,
            )
        except ServiceError as exc:
            chat = isinstance(body, p.ChatCompletionRequest)
            raise from_service_error(
                exc, {"max_tokens": max_name, "prompts": "messages" if chat else "prompt"}
            ) from None
        return target, prompts, params, ref.job_id

    async def finished(user: str, job_id: str) -> JobRecord:
        while not (record := await service.wait_job(user, job_id, 60)).finished:
            pass
        return record

    def failure(record: JobRecord) -> OpenAIError:
        return OpenAIError(400 if record.error_category == "user" else 500, record.error or "sampling failed")

    @router.post("/v1/chat/completions", response_model=p.ChatCompletion)
    async def chat_completions(body: p.ChatCompletionRequest, user: User, request: Request):
        refuse_unsupported(
            body,
            {
                "tools": bool,
                "functions": bool,
                "response_format": lambda v: bool(v) and v.get("type") != "text",
                "best_of": lambda v: v is not None and v != body.n,
                "modalities": lambda v: v is not None and v != ["text"],
                "audio": lambda v: v is not None,
                "prediction": lambda v: v is not None,
                "reasoning_effort": lambda v: v is not None,
                "web_search_options": lambda v: v is not None,
            },
        )
        max_tokens, max_name = (
            (body.max_completion_tokens, "max_completion_tokens")
            if body.max_completion_tokens
            else (body.max_tokens, "max_tokens")
        )
        top = (body.top_logprobs or 0) if body.logprobs else 0
        if body.top_logprobs and not body.logprobs:
            raise OpenAIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        job = _Job(
            service,
            user,
            "chatcmpl",
            n=body.n,
            chat=True,
            logprobs=bool(body.logprobs),
            top=top,
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )
        return await job.run(
            lambda: submit(user, body, lambda m: [chat_prompt(m, body)], max_tokens, max_name, top, job.progress),
            finished,
            failure,
            request,
        )

    @router.post("/v1/completions", response_model=p.Completion)
    async def completions(body: p.CompletionRequest, user: User, request: Request):
        refuse_unsupported(body, {"suffix": bool, "best_of": lambda v: v is not None and v != body.n})
        if body.max_tokens == 0 and not body.echo:
            raise OpenAIError(400, "max_tokens must be at least 1 (0 only with echo: score the prompt)", "max_tokens")
        if body.echo:
            from .echo import echo_completion  # it builds on this module's errors and targets

            return await echo_completion(
                service,
                user,
                body,
                f"cmpl-{uuid.uuid4().hex[:24]}",
                int(time.time()),
                resolve=resolve,
                sampling_params=sampling_params,
                prompts_of=completion_prompts,
                finished=finished,
                failure=failure,
            )
        top = body.logprobs or 0
        job = _Job(
            service,
            user,
            "cmpl",
            n=body.n,
            chat=False,
            logprobs=body.logprobs is not None,
            top=top,
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )
        return await job.run(
            lambda: submit(
                user, body, lambda m: completion_prompts(m, body), body.max_tokens, "max_tokens", top, job.progress
            ),
            finished,
            failure,
            request,
        )

    from .tokenizer import add_tokenizer_routes  # vLLM's /tokenize and the like; it builds on this module

    add_tokenizer_routes(router, service, resolve)
    return router


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed its connection. (The body has been read by now: the
    server's next message for this request is its disconnect.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Job:
    """One chat or completion request: submits its sample, then answers it whole or streams it."""

    def __init__(
        self,
        service: Service,
        user: str,
        prefix: str,
        *,
        n: int,
        chat: bool,
        logprobs: bool,
        top: int,
        stream: bool,
        include_usage: bool,
    ):
        self.service, self.user, self.n, self.chat, self.logprobs, self.top = service, user, n, chat, logprobs, top
        self.stream, self.include_usage = stream, include_usage
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[SampledToken]] = asyncio.Queue()
        self.progress = self._push if stream else None

    def _push(self, tokens: list[SampledToken]) -> None:  # the worker thread
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, tokens)

    async def run(self, submit, finished, failure, request: Request):
        self.target, self.prompts, self.params, job_id = await run_in_threadpool(submit)
        self.model = self.service.models[self.target.base_model]
        self.stop_ids = frozenset(self.model.stop_token_ids)
        if not self.stream:
            answer = asyncio.ensure_future(finished(self.user, job_id))
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (answer, gone):
                    task.cancel()
            if not answer.done() or answer.cancelled():
                # Nobody is left to read the answer: the sample stops at its next decode step.
                self.service.cancel_job(job_id, "the client disconnected before its answer")
                return Response(status_code=499)  # never sent: the connection is gone
            record = answer.result()
            if record.error is not None:
                raise failure(record)
            return await run_in_threadpool(self._whole, record.result())
        return StreamingResponse(
            self._events(job_id, finished, failure),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ----------------------------------------------------------------------- whole answers
    def _visible(self, sequence: dict) -> list[int]:
        tokens = sequence["tokens"]
        return tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens

    def _usage(self, value: dict) -> p.Usage:
        prompt = sum(len(t) for t in self.prompts)
        completion = sum(len(s["tokens"]) for row in value["sequences"] for s in row)
        return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _whole(self, value: dict):
        choices: list[p.ChatChoice | p.CompletionChoice] = []
        for prompt_index, row in enumerate(value["sequences"]):
            for k, sequence in enumerate(row):
                index = prompt_index * len(row) + k
                count = len(self._visible(sequence))
                picked = list(
                    zip(sequence["tokens"], sequence["logprobs"], sequence.get("top_logprobs") or [None] * count)
                )[:count]
                if self.chat:
                    logprobs = p.ChatLogprobs(content=self._chat_logprobs(picked)) if self.logprobs else None
                    choices.append(
                        p.ChatChoice(
                            index=index,
                            message=p.ChatMessageOut(content=sequence["text"]),
                            logprobs=logprobs,
                            finish_reason=sequence["stop_reason"],
                        )
                    )
                else:
                    completion_logprobs = self._completion_logprobs(picked, 0) if self.logprobs else None
                    choices.append(
                        p.CompletionChoice(
                            index=index,
                            text=sequence["text"],
                            logprobs=completion_logprobs,
                            finish_reason=sequence["stop_reason"],
                        )
                    )
        kind = p.ChatCompletion if self.chat else p.Completion
        return kind(id=self.id, created=self.created, model=self.target.name, choices=choices, usage=self._usage(value))

    def _pieces(self, tokens: list[int]) -> list[bytes]:
        return self.service.token_bytes(self.model.name, tokens)

    def _chat_logprobs(self, picked: list[tuple]) -> list[p.TokenLogprob]:
        ids = [t for t, _, _ in picked] + [t for _, _, top in picked for t, _ in (top or [])[: self.top]]
        pieces = dict(zip(ids, self._pieces(ids))) if ids else {}

        def entry(token: int, logprob: float) -> dict:
            raw = pieces[token]
            return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

        return [
            p.TokenLogprob(
                **entry(t, lp), top_logprobs=[p.TopLogprob(**entry(tt, tlp)) for tt, tlp in (top or [])[: self.top]]
            )
            for t, lp, top in picked
        ]

    def _completion_logprobs(self, picked: list[tuple], offset: int) -> p.CompletionLogprobs:
        ids = [t for t, _, _ in picked] + [t for _, _, top in picked for t, _ in (top or [])[: self.top]]
        pieces = dict(zip(ids, self._pieces(ids))) if ids else {}
        text = lambda t: pieces[t].decode("utf-8", "replace")  # noqa: E731
        offsets, at = [], offset
        for t, _, _ in picked:
            offsets.append(at)
            at += len(text(t))
        return p.CompletionLogprobs(
            tokens=[text(t) for t, _, _ in picked],
            token_logprobs=[lp for _, lp, _ in picked],
            top_logprobs=[{text(tt): tlp for tt, tlp in (top or [])[: self.top]} for _, _, top in picked]
            if self.top
            else None,
            text_offset=offsets,
        )

    # ----------------------------------------------------------------------------- streams
    def _chunk(self, choices: list, usage: p.Usage | None = None) -> str:
        kind = p.ChatCompletionChunk if self.chat else p.Completion
        body = kind(id=self.id, created=self.created, model=self.target.name, choices=choices, usage=usage)
        exclude = None if (self.include_usage or usage is not None) else {"usage"}
        return f"data: {body.model_dump_json(exclude=exclude)}\n\n"

    def _delta(
        self,
        index: int,
        text: str | None,
        picked: list[tuple],
        choice: _Choice,
        finish: str | None = None,
        role: bool = False,
    ):
        if self.chat:
            logprobs = p.ChatLogprobs(content=self._chat_logprobs(picked)) if self.logprobs and picked else None
            return p.ChatChunkChoice(
                index=index,
                delta=p.ChatDelta(role="assistant" if role else None, content=text),
                logprobs=logprobs,
                finish_reason=finish,
            )
        completion_logprobs = (
            self._completion_logprobs(picked, len(choice.emitted) - len(text or ""))
            if self.logprobs and picked
            else None
        )
        return p.CompletionChoice(index=index, text=text or "", logprobs=completion_logprobs, finish_reason=finish)

    def _advance(self, choice: _Choice, token: int) -> None:
        """Incremental detokenization: decode a short window, take what it adds once it ends in
        whole characters (a token may hold part of a UTF-8 character)."""
        decode = lambda tokens: self.service.decode(self.model.name, tokens)  # noqa: E731
        choice.tokens.append(token)
        before = decode(choice.tokens[choice.prefix_offset : choice.read_offset])
        after = decode(choice.tokens[choice.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            choice.text += after[len(before) :]
            choice.prefix_offset, choice.read_offset = choice.read_offset, len(choice.tokens)

    def _ready(self, choice: _Choice) -> str:
        """New text that can be sent: a stop string's possible beginning is held back."""
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        safe = choice.text[: len(choice.text) - hold] if hold else choice.text
        if len(safe) <= len(choice.emitted) or not safe.startswith(choice.emitted):
            return ""
        new = safe[len(choice.emitted) :]
        choice.emitted = safe
        return new

    async def _events(self, job_id: str, finished, failure) -> AsyncIterator[str]:
        per_prompt = self.n
        choices = [_Choice() for _ in range(len(self.prompts) * per_prompt)]
        done_task = asyncio.ensure_future(finished(self.user, job_id))
        try:
            for index, choice in enumerate(choices):
                yield self._chunk([self._delta(index, "" if self.chat else None, [], choice, role=True)])
            while True:
                getter = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter, done_task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                batches = [getter.result()]
                while not self.queue.empty():
                    batches.append(self.queue.get_nowait())
                for chunk in self._step(batches, choices, per_prompt):
                    yield chunk
            while not self.queue.empty():  # sent before the job finished: all are in the queue by now
                for chunk in self._step([self.queue.get_nowait()], choices, per_prompt):
                    yield chunk
            record = done_task.result()
            if record.error is not None:
                error = failure(record)
                yield (
                    "data: "
                    + json.dumps(
                        {
                            "error": {
                                "message": error.message,
                                "type": "server_error" if error.status >= 500 else "invalid_request_error",
                                "param": None,
                                "code": None,
                            }
                        }
                    )
                    + "\n\n"
                )
                yield "data: [DONE]\n\n"
                return
            value = record.result()
            for prompt_index, row in enumerate(value["sequences"]):
                for k, sequence in enumerate(row):
                    index = prompt_index * per_prompt + k
                    choice = choices[index]
                    tail = (
                        sequence["text"][len(choice.emitted) :] if sequence["text"].startswith(choice.emitted) else ""
                    )
                    # The candidate's last token came with its stop reason: its logprob goes out here.
                    last = []
                    if (
                        self.logprobs
                        and choice.done
                        and sequence["tokens"]
                        and sequence["tokens"][-1] not in self.stop_ids
                    ):
                        top = (sequence.get("top_logprobs") or [None])[-1]
                        last = [(sequence["tokens"][-1], sequence["logprobs"][-1], top)]
                    choice.emitted += tail
                    yield self._chunk(
                        [
                            self._delta(
                                index,
                                tail if (tail or not self.chat) else None,
                                last,
                                choice,
                                finish=sequence["stop_reason"],
                            )
                        ]
                    )
            if self.include_usage:
                yield self._chunk([], usage=self._usage(value))
            yield "data: [DONE]\n\n"
        finally:
            if not done_task.done():  # the client went away: the sample stops at its next decode step
                done_task.cancel()
                self.service.cancel_job(job_id, "the client of this stream disconnected")

    def _step(self, batches: list[list[SampledToken]], choices: list[_Choice], per_prompt: int):
        new: dict[int, list[tuple]] = {}
        for tokens in batches:
            for t in tokens:
                index = t.prompt * per_prompt + t.sample
                choice = choices[index]
                if t.stop_reason is not None:
                    choice.done = True  # its text is settled from the result (stop strings cut there)
                    continue
                self._advance(choice, t.token)
                new.setdefault(index, []).append((t.token, t.logprob, t.top))
        for index, picked in sorted(new.items()):
            choice = choices[index]
            text = self._ready(choice)
            if text or (self.logprobs and picked):
                yield self._chunk([self._delta(index, text, picked, choice)])
