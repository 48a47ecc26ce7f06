"""The OpenAI protocol's logic over one Service: what a `model` name samples from, the models a
user may name, sampling parameters and prompts in OpenAI's terms, and the sample job behind each
chat or completion request (answers.py answers it, whole or streamed). The router (router.py)
only maps routes onto these methods.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import cast

from fastapi import Request
from pydantic import ValidationError

from ...types import ChatMessage, Prompt, SamplingParams, parse_checkpoint_ref
from ..records import JobRecord
from ..service import Service, ServiceError
from ..tinker.protocol import parse_tinker_path
from . import protocol as p
from .answers import SampleAnswer, Submitted, Target
from .errors import OpenAIError, from_service_error

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class OpenAIServing:
    """The OpenAI protocol over one Service. Its state is the service's; each request's own
    (its sample job, a stream's text so far) is a `SampleAnswer`'s."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.started = int(time.time())  # the base models' `created`

    # --------------------------------------------------------------------------- models
    @staticmethod
    def not_found(name: str) -> OpenAIError:
        return OpenAIError(
            404, f"The model `{name}` does not exist or you do not have access to it.", "model", "model_not_found"
        )

    def resolve(self, user: str, name: str) -> Target:
        """What `name` samples from: a base model, a run's live adapter, or a saved checkpoint."""
        service = self.service
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
                return Target(name, self._held(run.base_model, name), run_id=name)
            path, _ = service.checkpoint_path(user, ref, field="model")
        except ValueError:
            raise self.not_found(name) from None
        except ServiceError as exc:
            if exc.status in (404, 422):
                raise self.not_found(name) from None
            raise from_service_error(exc) from None
        return Target(name, self._held(service.run_record(run_id).base_model, name), snapshot=path)

    def _held(self, base_model: str, name: str) -> str:
        if base_model not in self.service.models:
            raise OpenAIError(
                400,
                f"model `{name}` is on base model {base_model!r}, which this server does not hold "
                f"(start it with --model {base_model})",
                "model",
                "model_not_available",
            )
        return base_model

    def models_of(self, user: str) -> list[p.Model]:
        service = self.service
        models = [p.Model(id=name, created=self.started, owned_by="eztinker", root=name) for name in service.models]
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

    def model(self, user: str, name: str) -> p.Model:
        target = self.resolve(user, name)
        found = next((m for m in self.models_of(user) if m.id == name), None)
        if found is None:  # a tinker:// name of a checkpoint listed under its own name
            found = p.Model(id=name, created=0, owned_by=user, root=target.base_model, parent=target.base_model)
        return found

    # ------------------------------------------------------------------------- requests
    def sampling_params(self, body: p._Sampling, max_tokens: int | None, max_name: str) -> SamplingParams:
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
        max_tokens = max_tokens or self.service.settings.max_new_tokens
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

    def chat_prompt(self, model: str, body: p.ChatCompletionRequest) -> list[int]:
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
        return self.service.encode_prompt(model, Prompt(messages=messages), ("messages",))

    def completion_prompts(self, model: str, body: p.CompletionRequest) -> list[list[int]]:  # also echo.py's
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
            prompts.append(self.service.encode_prompt(model, one, ("prompt",)))
        return prompts

    @staticmethod
    def refuse_unsupported(body: p._Sampling, names: dict[str, Callable]) -> None:
        for name, unsupported in names.items():
            if unsupported(getattr(body, name, None)):
                raise OpenAIError(400, f"{name} is not supported by this server", name)

    def submit(
        self,
        user: str,
        body: p._Sampling,
        prompts_of: Callable[[str], list[list[int]]],
        max_tokens: int | None,
        max_name: str,
        top: int,
        progress,
    ) -> Submitted:
        """Validate and queue the sample (a thread-pool thread: tokenizer and database work)."""
        target = self.resolve(user, body.model)
        params = self.sampling_params(body, max_tokens, max_name)
        try:
            prompts = prompts_of(target.base_model)
            ref = self.service.submit_sample_tokens(
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
        return Submitted(target, prompts, params, ref.job_id)

    async def finished(self, user: str, job_id: str) -> JobRecord:
        while not (record := await self.service.wait_job(user, job_id, 60)).finished:
            pass
        return record

    @staticmethod
    def failure(record: JobRecord) -> OpenAIError:
        return OpenAIError(400 if record.error_category == "user" else 500, record.error or "sampling failed")

    # --------------------------------------------------------------------------- endpoints
    async def chat_completions(self, body: p.ChatCompletionRequest, user: str, request: Request):
        self.refuse_unsupported(
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
        answer = SampleAnswer(
            self.service,
            user,
            "chatcmpl",
            n=body.n,
            chat=True,
            logprobs=bool(body.logprobs),
            top=top,
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )
        prompts_of = lambda m: [self.chat_prompt(m, body)]  # noqa: E731
        return await answer.run(
            lambda: self.submit(user, body, prompts_of, max_tokens, max_name, top, answer.progress),
            self.finished,
            self.failure,
            request,
        )

    async def completions(self, body: p.CompletionRequest, user: str, request: Request):
        self.refuse_unsupported(body, {"suffix": bool, "best_of": lambda v: v is not None and v != body.n})
        if body.max_tokens == 0 and not body.echo:
            raise OpenAIError(400, "max_tokens must be at least 1 (0 only with echo: score the prompt)", "max_tokens")
        if body.echo:
            from .echo import echo_completion  # it builds on this module's targets and prompts

            return await echo_completion(
                self.service,
                user,
                body,
                f"cmpl-{uuid.uuid4().hex[:24]}",
                int(time.time()),
                resolve=self.resolve,
                sampling_params=self.sampling_params,
                prompts_of=self.completion_prompts,
                finished=self.finished,
                failure=self.failure,
            )
        top = body.logprobs or 0
        answer = SampleAnswer(
            self.service,
            user,
            "cmpl",
            n=body.n,
            chat=False,
            logprobs=body.logprobs is not None,
            top=top,
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )
        prompts_of = lambda m: self.completion_prompts(m, body)  # noqa: E731
        return await answer.run(
            lambda: self.submit(user, body, prompts_of, body.max_tokens, "max_tokens", top, answer.progress),
            self.finished,
            self.failure,
            request,
        )
