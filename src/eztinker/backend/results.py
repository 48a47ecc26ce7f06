"""What each command produces: one pydantic model per command kind, shared with the REST types
where both mean the same thing (`ForwardBackwardResult`, `OptimStepResult`, `ScoreResult`,
`SampledSequence`).

A job's result is stored as the JSON of its model (`dump_result`) and read back with the model of
its kind (`parse_result`); what a router sends, the REST API's job results above all, is that JSON,
so a field added here is a field clients see. Fields that are None are left out of the JSON, as
the hand-built dicts these models replace left them out.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ..types import (
    CheckpointInfo,
    ForwardBackwardResult,
    OptimStepResult,
    SampledSequence,
    SampleResult,
    ScoreResult,
)


class JobKind(StrEnum):
    """A command's kind, and so its job's: the `kind` column of the jobs table."""

    create_run = "create_run"
    delete_run = "delete_run"
    forward_backward = "forward_backward"
    optim_step = "optim_step"
    sample = "sample"
    score = "score"
    score_prompts = "score_prompts"
    save = "save"
    load = "load"


class _Result(BaseModel):
    # Results are the server's own numbers, not client input: a -inf logprob is what it is.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)


class RunCreated(_Result):
    run_id: str
    step: int = Field(description="0, or the step of the checkpoint it started from.")


class RunDeleted(_Result):
    deleted: str = Field(description="The run's id.")


class AltTokens(_Result):
    """One prompt's independent draws at positions 1 .. len - 1, and their temperature-1 logprobs."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


# Per prompt position: the k most likely (token, logprob), most likely first; None at position 0
# (and outside a `prompt_logprobs_last_n` window).
TopK = list[tuple[int, float]] | None


class Samples(SampleResult):
    """A Sample command's candidates (the REST `SampleResult`), with what else it asked for, per prompt."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)

    prompt_logprobs: list[list[float | None]] | None = None
    topk_prompt_logprobs: list[list[TopK]] | None = None
    target_prompt_logprobs: list[list[list[float]]] | None = Field(
        None, description="Per prompt, per position 1 .. len - 1: the logprobs of the token ids asked for there."
    )
    prompt_alt_tokens: list[AltTokens] | None = None

    def sampled_tokens(self) -> int:
        return sum(len(s.tokens) for row in self.sequences for s in row)


class PromptScores(_Result):
    """A ScorePrompts command's logprobs, per prompt and position (the first: None)."""

    prompt_logprobs: list[list[float | None]]
    topk_prompt_logprobs: list[list[TopK]] | None = None


class Saved(_Result):
    step: int = Field(description="The step of the state saved.")


class Loaded(_Result):
    step: int = Field(description="The step of the state loaded.")
    restored_from: str | None = Field(None, description="'<run_id>/<name>': the checkpoint (the job's result).")


Result = (
    RunCreated
    | RunDeleted
    | ForwardBackwardResult
    | OptimStepResult
    | Samples
    | ScoreResult
    | PromptScores
    | Saved
    | Loaded
    | CheckpointInfo
)
R = TypeVar("R", bound=BaseModel)

# The model of each kind's stored job result. A save's job result is its checkpoint's record (the
# runner writes it), not the backend's `Saved`; every other kind stores what its command produced.
JOB_RESULTS: dict[JobKind, type[BaseModel]] = {
    JobKind.create_run: RunCreated,
    JobKind.delete_run: RunDeleted,
    JobKind.forward_backward: ForwardBackwardResult,
    JobKind.optim_step: OptimStepResult,
    JobKind.sample: Samples,
    JobKind.score: ScoreResult,
    JobKind.score_prompts: PromptScores,
    JobKind.save: CheckpointInfo,
    JobKind.load: Loaded,
}


def dump_result(result: BaseModel) -> str:
    """A result's JSON as stored and served. json.dumps, not pydantic's JSON: a -inf logprob stays
    -Infinity (pydantic writes null), as results were stored before they were typed."""
    return json.dumps(result.model_dump(exclude_none=True))


def parse_result(kind: JobKind | str, text: str) -> BaseModel:
    """A stored job result, read with its kind's model."""
    return JOB_RESULTS[JobKind(kind)].model_validate_json(text)


def parse_result_as(model: type[R], kind: JobKind | str, text: str) -> R:
    """A stored job result that must be a `model` (a TypeError names what it was instead)."""
    result = parse_result(kind, text)
    if not isinstance(result, model):
        raise TypeError(f"a {kind} job's result is a {type(result).__name__}, not a {model.__name__}")
    return result


__all__ = [
    "JOB_RESULTS",
    "AltTokens",
    "CheckpointInfo",
    "ForwardBackwardResult",
    "JobKind",
    "Loaded",
    "OptimStepResult",
    "PromptScores",
    "Result",
    "RunCreated",
    "RunDeleted",
    "SampledSequence",
    "Samples",
    "Saved",
    "ScoreResult",
    "parse_result",
    "parse_result_as",
]
