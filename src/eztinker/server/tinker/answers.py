"""`TinkerServing`'s retrieve_future: a long poll for a job, answered with its result in the
protocol's shape (protobuf for forward_backward and samples, JSON otherwise)."""

from __future__ import annotations

from typing import Any

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from ...backend.results import (
    ForwardBackwardResult,
    JobKind,
    Loaded,
    OptimStepResult,
    RunCreated,
    Samples,
    parse_result,
)
from ...types import CheckpointInfo
from ..records import INTERRUPTED, JobRecord
from ..service import ServiceError
from . import protocol as p
from . import wire
from .core import TinkerCore
from .futures import POLL_SECONDS, error_body
from .provenance import RecordedSequence


class AnswersPart(TinkerCore):
    """A future's answer: its job's result in the protocol's shape (protobuf or JSON), long-polled."""

    async def retrieve(self, user: str, request_id: str) -> Response:
        try:
            record = await self.service.wait_job(user, request_id, POLL_SECONDS)
        except ServiceError:
            return error_body(404, f"future {request_id} not found (unknown, or expired)")
        if not record.finished:
            return JSONResponse({"type": "try_again", "request_id": record.id, "queue_state": "active"})
        if record.error is not None:
            if record.error == INTERRUPTED and record.kind is JobKind.sample:
                return error_body(410, record.error)  # the SDK submits a sample again on 410
            return JSONResponse({"error": record.error, "category": record.error_category or "server"})
        # Off the event loop: reading a large result and encoding it as protobuf take milliseconds.
        return await run_in_threadpool(self._answer, user, record)

    def _answer(self, user: str, record: JobRecord) -> Response:
        assert record.result_json is not None, "a completed job has its result"
        value, extra = parse_result(record.kind, record.result_json), self.extras.get(record.id)
        if isinstance(value, ForwardBackwardResult):
            logprobs = [[_known(lp) for lp in row] for row in value.logprobs]
            body = wire.encode_forward_backward_output(logprobs, {"loss:sum": value.loss})
            return Response(body, media_type="application/x-protobuf")
        if isinstance(value, Samples):
            if extra.stability_session is not None:
                for i, seq in enumerate(value.sequences[0]):
                    self.stability.record(
                        f"{record.id}:{i}",
                        RecordedSequence(extra.stability_session, extra.prompt, tuple(seq.tokens), tuple(seq.logprobs)),
                    )
            targets, alt = value.target_prompt_logprobs, value.prompt_alt_tokens
            if targets is not None and extra.target_grid is None:  # its layout was lost (a restart): sample again
                return error_body(410, "this sample's target_prompt_logprobs layout is gone; send it again")
            body = wire.encode_sample_response(
                value.sequences[0],
                prompt_logprobs=None if value.prompt_logprobs is None else value.prompt_logprobs[0],
                topk_prompt_logprobs=None if value.topk_prompt_logprobs is None else value.topk_prompt_logprobs[0],
                target_prompt_logprobs=None
                if targets is None or extra.target_grid is None
                else extra.target_grid.answer(targets[0]),
                prompt_alt_tokens=None if alt is None else (alt[0].tokens, alt[0].logprobs),
            )
            return Response(body, media_type="application/x-protobuf")
        if isinstance(value, RunCreated):
            return JSONResponse({"model_id": record.run_id, **({"path": extra.path} if extra.path else {})})
        if isinstance(value, OptimStepResult):
            return JSONResponse({"metrics": value.model_dump()})
        if isinstance(value, CheckpointInfo):  # a save's
            if extra.sampling_session_id is not None:
                return JSONResponse({"sampling_session_id": extra.sampling_session_id})
            return JSONResponse({"path": p.tinker_path(value.run_id, value.name)})
        if isinstance(value, Loaded):
            return JSONResponse({"path": extra.path, "model_id": record.run_id})
        return JSONResponse(value.model_dump(mode="json"))


def _known(logprob: Any) -> Any:
    """A logprob, or a row of K, with None (not computed) as 0.0."""
    if isinstance(logprob, list):
        return [0.0 if lp is None else lp for lp in logprob]
    return 0.0 if logprob is None else logprob
