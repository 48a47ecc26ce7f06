"""A Tinker future: the id a submitted request answers with, and what its answer needs beyond
its job's result. Tinker reports errors through futures, and in its own error shape.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from . import wire

POLL_SECONDS = 25.0  # a retrieve_future holds this long before answering try_again (the SDK waits 45 s)
_EXTRAS_KEPT = 100_000


def error_body(status: int, message: str, loc: tuple | None = None) -> JSONResponse:
    """Tinker's error shape. A 409 (which the SDK retries for minutes) goes out as a 400."""
    content: dict[str, Any] = {"error": message, "category": "user" if status < 500 else "server"}
    if loc:
        content["loc"] = list(loc)
    return JSONResponse(status_code=400 if status == 409 else status, content=content)


@dataclass(frozen=True)
class FutureRef:
    """A submitted request's answer: the future to poll, and what the SDK reads beside it."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None

    def body(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("request_id", self.request_id),
                ("model_id", self.model_id),
                ("sample_sequence_ids", self.sample_sequence_ids),
            )
            if v is not None
        }


@dataclass(frozen=True)
class FutureExtra:
    """What a future's answer needs beyond its job's result."""

    sampling_session_id: str | None = None  # an unnamed sampler snapshot's session
    path: str | None = None  # a load's tinker path, echoed back
    model_id: str | None = None
    # A sample of a client made with record_stability_info: its session and prompt, to record
    # its sequences when they are answered.
    stability_session: str | None = None
    prompt: tuple[int, ...] = ()
    target_grid: wire.TargetGrid | None = None  # a sample's target_prompt_logprobs: the answer's layout


@dataclass
class FutureExtras:
    """FutureExtra by job id, the newest _EXTRAS_KEPT (a future is retrieved soon after it is made)."""

    _by_job: OrderedDict[str, FutureExtra] = field(default_factory=OrderedDict)

    def remember(self, job_id: str, extra: FutureExtra) -> None:
        self._by_job[job_id] = extra
        while len(self._by_job) > _EXTRAS_KEPT:
            self._by_job.popitem(last=False)

    def get(self, job_id: str) -> FutureExtra:
        return self._by_job.get(job_id) or FutureExtra()
