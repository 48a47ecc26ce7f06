"""One chat or completion request's answer: its sample job answered whole, or streamed as
server-sent events while the sampler decodes.

Everything that asks the backend's tokenizer (detokenising a stream, a token's bytes for its
logprobs) runs in a worker thread, never on the event loop: on the Ray backend each such call is a
blocking round trip to an engine worker.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from ...backend.results import Samples, parse_result_as
from ...types import SampledSequence, SampledToken, SamplingParams
from ..records import JobRecord
from ..service import Service
from . import protocol as p
from .errors import OpenAIError, error_content

# (token, its logprob, the k most likely (token, logprob) there when asked for)
Picked = tuple[int, float, list[tuple[int, float]] | None]


@dataclass
class Target:
    """What a `model` name samples from."""

    name: str
    base_model: str
    run_id: str | None = None
    snapshot: Path | None = None


@dataclass
class Submitted:
    """A sample job queued for a request, and what its answer is made of."""

    target: Target
    prompts: list[list[int]]
    params: SamplingParams
    job_id: str


@dataclass
class _Choice:
    """One candidate being streamed: its text so far, decoded incrementally."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    done: bool = False


async def disconnected(request: Request) -> None:
    """Returns once the client has closed its connection. (The body has been read by now: the
    server's next message for this request is its disconnect.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class SampleAnswer:
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

    async def run(
        self,
        submit: Callable[[], Submitted],
        finished: Callable[[str, str], Awaitable[JobRecord]],
        failure: Callable[[JobRecord], OpenAIError],
        request: Request,
    ):
        submitted = await run_in_threadpool(submit)
        self.target, self.prompts, self.params = submitted.target, submitted.prompts, submitted.params
        job_id = submitted.job_id
        self.model = self.service.models[self.target.base_model]
        self.stop_ids = frozenset(self.model.stop_token_ids)
        if not self.stream:
            answer = asyncio.ensure_future(finished(self.user, job_id))
            gone = asyncio.ensure_future(disconnected(request))
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
            return await run_in_threadpool(self._whole, record)
        return StreamingResponse(
            self._events(job_id, finished, failure),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ----------------------------------------------------------------------- whole answers
    @staticmethod
    def _samples(record: JobRecord) -> Samples:
        assert record.result_json is not None, "a completed job has its result"
        return parse_result_as(Samples, record.kind, record.result_json)

    def _visible(self, sequence: SampledSequence) -> list[int]:
        tokens = sequence.tokens
        return tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens

    def _usage(self, samples: Samples) -> p.Usage:
        prompt = sum(len(t) for t in self.prompts)
        completion = samples.sampled_tokens()
        return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    @staticmethod
    def _picked(sequence: SampledSequence, count: int) -> list[Picked]:
        tops: list[list[tuple[int, float]] | None] = [None] * len(sequence.tokens)
        if sequence.top_logprobs:
            tops = list(sequence.top_logprobs)
        return [(t, lp, top) for t, lp, top in zip(sequence.tokens, sequence.logprobs, tops)][:count]

    def _whole(self, record: JobRecord) -> p.ChatCompletion | p.Completion:  # a worker thread
        samples = self._samples(record)
        choices: list[p.ChatChoice | p.CompletionChoice] = []
        for prompt_index, row in enumerate(samples.sequences):
            for k, sequence in enumerate(row):
                index = prompt_index * len(row) + k
                picked = self._picked(sequence, len(self._visible(sequence)))
                if self.chat:
                    logprobs = p.ChatLogprobs(content=self._chat_logprobs(picked)) if self.logprobs else None
                    choices.append(
                        p.ChatChoice(
                            index=index,
                            message=p.ChatMessageOut(content=sequence.text),
                            logprobs=logprobs,
                            finish_reason=sequence.stop_reason,
                        )
                    )
                else:
                    completion_logprobs = self._completion_logprobs(picked, 0) if self.logprobs else None
                    choices.append(
                        p.CompletionChoice(
                            index=index,
                            text=sequence.text,
                            logprobs=completion_logprobs,
                            finish_reason=sequence.stop_reason,
                        )
                    )
        kind = p.ChatCompletion if self.chat else p.Completion
        return kind(
            id=self.id, created=self.created, model=self.target.name, choices=choices, usage=self._usage(samples)
        )

    def _pieces(self, picked: list[Picked]) -> dict[int, bytes]:
        """Each token's bytes (the picked ones and their top alternatives): one tokenizer call."""
        ids = [t for t, _, _ in picked] + [t for _, _, top in picked for t, _ in (top or [])[: self.top]]
        return dict(zip(ids, self.service.token_bytes(self.model.name, ids))) if ids else {}

    def _chat_logprobs(self, picked: list[Picked]) -> list[p.TokenLogprob]:
        pieces = self._pieces(picked)

        def entry(token: int, logprob: float) -> dict:
            raw = pieces[token]
            return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

        return [
            p.TokenLogprob(
                **entry(t, lp), top_logprobs=[p.TopLogprob(**entry(tt, tlp)) for tt, tlp in (top or [])[: self.top]]
            )
            for t, lp, top in picked
        ]

    def _completion_logprobs(self, picked: list[Picked], offset: int) -> p.CompletionLogprobs:
        pieces = self._pieces(picked)
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
        picked: list[Picked],
        choice: _Choice,
        finish: str | None = None,
        role: bool = False,
    ) -> p.ChatChunkChoice | p.CompletionChoice:
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

    def _advance(self, choice: _Choice, tokens: list[int]) -> None:
        """Incremental detokenization: decode a short window, take what it adds once it ends in
        whole characters (a token may hold part of a UTF-8 character). Two tokenizer calls per
        candidate per step, however many tokens the step brought."""
        decode = lambda ids: self.service.decode(self.model.name, ids)  # noqa: E731
        choice.tokens.extend(tokens)
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

    async def _events(
        self,
        job_id: str,
        finished: Callable[[str, str], Awaitable[JobRecord]],
        failure: Callable[[JobRecord], OpenAIError],
    ) -> AsyncIterator[str]:
        choices = [_Choice() for _ in range(len(self.prompts) * self.n)]
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
                for chunk in await asyncio.to_thread(self._step, batches, choices):
                    yield chunk
            # Sent before the job finished: all are in the queue by now.
            batches = []
            while not self.queue.empty():
                batches.append(self.queue.get_nowait())
            if batches:
                for chunk in await asyncio.to_thread(self._step, batches, choices):
                    yield chunk
            record = done_task.result()
            if record.error is not None:
                error = failure(record)
                content = error_content(error.status, error.message)
                yield f"data: {json.dumps(content)}\n\n"
                yield "data: [DONE]\n\n"
                return
            for chunk in await asyncio.to_thread(self._last_chunks, record, choices):
                yield chunk
            yield "data: [DONE]\n\n"
        finally:
            if not done_task.done():  # the client went away: the sample stops at its next decode step
                done_task.cancel()
                self.service.cancel_job(job_id, "the client of this stream disconnected")

    def _step(self, batches: list[list[SampledToken]], choices: list[_Choice]) -> list[str]:  # a worker thread
        """The chunks for tokens decoded since the last step (several reports may have queued)."""
        new: dict[int, list[Picked]] = {}
        for tokens in batches:
            for t in tokens:
                index = t.prompt * self.n + t.sample
                if t.stop_reason is not None:
                    choices[index].done = True  # its text is settled from the result (stop strings cut there)
                    continue
                new.setdefault(index, []).append((t.token, t.logprob, t.top))
        chunks = []
        for index, picked in sorted(new.items()):
            choice = choices[index]
            self._advance(choice, [t for t, _, _ in picked])
            text = self._ready(choice)
            if text or (self.logprobs and picked):
                chunks.append(self._chunk([self._delta(index, text, picked, choice)]))
        return chunks

    def _last_chunks(self, record: JobRecord, choices: list[_Choice]) -> list[str]:  # a worker thread
        """Each candidate's rest (its text as the result settled it) and finish reason, then the usage."""
        samples = self._samples(record)
        chunks = []
        for prompt_index, row in enumerate(samples.sequences):
            for k, sequence in enumerate(row):
                index = prompt_index * self.n + k
                choice = choices[index]
                tail = sequence.text[len(choice.emitted) :] if sequence.text.startswith(choice.emitted) else ""
                # The candidate's last token came with its stop reason: its logprob goes out here.
                last: list[Picked] = []
                if self.logprobs and choice.done and sequence.tokens and sequence.tokens[-1] not in self.stop_ids:
                    top = sequence.top_logprobs[-1] if sequence.top_logprobs else None
                    last = [(sequence.tokens[-1], sequence.logprobs[-1], top)]
                choice.emitted += tail
                text = tail if (tail or not self.chat) else None
                chunks.append(self._chunk([self._delta(index, text, last, choice, finish=sequence.stop_reason)]))
        if self.include_usage:
            chunks.append(self._chunk([], usage=self._usage(samples)))
        return chunks
