"""Model work as data: every operation on a base model is a plain, serialisable command.

A command names its base model, its run (or none, for the bare model) and its payload; it holds
no engine, store or callback, so it can be queued, fused with its neighbours, sent to another
process (`Command.model_dump_json()` / `parse_command`) and replayed. Each kind produces its own
result model (results.py), inside an `Outcome`. Paths are absolute and point into the server's
data directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from ..types import AdamParams, Datum, LoraConfig, LossFnName, SamplingParams
from .results import JobKind, Result


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Base model the command runs on.")
    run_id: str | None = Field(None, description="The run (LoRA adapter); None: the bare base model.")


class CreateRun(_Command):
    kind: Literal[JobKind.create_run] = JobKind.create_run
    run_id: str
    lora: LoraConfig
    seed: int = 0
    from_checkpoint: str | None = Field(None, description="Directory of a checkpoint to start from.")
    with_optimizer: bool = Field(True, description="Also restore the checkpoint's optimizer state.")


class DeleteRun(_Command):
    kind: Literal[JobKind.delete_run] = JobKind.delete_run
    run_id: str


class ForwardBackward(_Command):
    kind: Literal[JobKind.forward_backward] = JobKind.forward_backward
    run_id: str
    data: list[Datum]
    loss_fn: LossFnName = "cross_entropy"
    loss_fn_config: dict[str, float] = Field(default_factory=dict, description="e.g. PPO's clip thresholds.")
    forward_only: bool = Field(False, description="Logprobs and loss only: no gradient is accumulated.")
    all_logprobs: bool = Field(
        False, description="Logprobs at every position, not only where the loss is nonzero (Tinker's outputs)."
    )


class OptimStep(_Command):
    kind: Literal[JobKind.optim_step] = JobKind.optim_step
    run_id: str
    adam_params: AdamParams


class Sample(_Command):
    kind: Literal[JobKind.sample] = JobKind.sample
    prompts: list[list[int]]
    num_samples: int
    sampling_params: SamplingParams
    snapshot: str | None = Field(
        None, description="Sample from this saved checkpoint's adapter (a fixed snapshot) instead of run_id's live one."
    )
    prompt_logprobs: bool = Field(False, description="Also the logprob of every prompt token (the first: None).")
    topk_prompt_logprobs: int = Field(0, ge=0, description="Also the k most likely tokens at every prompt position.")
    topk_logprobs: int = Field(0, ge=0, description="Also the k most likely tokens at every sampled position.")
    prompt_logprobs_last_n: int | None = Field(
        None, ge=1, description="Prompt logprobs (and top-k) for each prompt's last n tokens only; the rest None."
    )
    prompt_targets: list[list[list[int]]] | None = Field(
        None, description="Per prompt, per position 1 .. len - 1: token ids whose logprobs to return there."
    )
    prompt_alt_tokens_k: int = Field(
        0,
        ge=0,
        description="Per prompt position 1 .. len - 1: this many independent draws from the model's "
        "next-token distribution at the sampling temperature, with their (temperature-1) logprobs.",
    )


class Score(_Command):
    kind: Literal[JobKind.score] = JobKind.score
    prompt: list[int]
    responses: list[list[int]]


class ScorePrompts(_Command):
    """Every prompt token's logprob given the tokens before it (the first: None) and, with topk,
    the k most likely tokens there: one forward pass, no decoding (OpenAI's `echo` with
    `max_tokens: 0`, as lm-eval's loglikelihood requests score a context and its continuation)."""

    kind: Literal[JobKind.score_prompts] = JobKind.score_prompts
    prompts: list[list[int]]
    snapshot: str | None = Field(None, description="Score under this saved checkpoint's adapter instead of run_id's.")
    topk: int = Field(0, ge=0, description="Also the k most likely tokens at every position.")


class Save(_Command):
    kind: Literal[JobKind.save] = JobKind.save
    run_id: str
    directory: str
    with_optimizer: bool = Field(True, description="Also save the optimizer state (False: weights only).")


class Load(_Command):
    kind: Literal[JobKind.load] = JobKind.load
    run_id: str
    directory: str
    with_optimizer: bool = Field(True, description="Also restore the optimizer state (else it starts afresh).")


Command = Annotated[
    CreateRun | DeleteRun | ForwardBackward | OptimStep | Sample | Score | ScorePrompts | Save | Load,
    Field(discriminator="kind"),
]
_COMMAND = TypeAdapter(Command)


def parse_command(data: str | bytes | dict) -> Command:
    """The command a `model_dump_json()` (or its dict) describes."""
    if isinstance(data, dict):
        return _COMMAND.validate_python(data)
    return _COMMAND.validate_json(data)


def fusable(first: Command, other: Command) -> bool:
    """Whether `other` may execute in one batch with `first`: samples of one base model (each
    row decodes with its own run's adapter), or prompt scorings of one base model; never across
    models or kinds."""
    return type(first) is type(other) and isinstance(first, (Sample, ScorePrompts)) and first.model == other.model


class ErrorCategory(StrEnum):
    user = "user"  # the command cannot succeed as sent (bad input): a 4xx
    server = "server"  # it failed here: a 5xx


T = TypeVar("T", bound=Result)
U = TypeVar("U", bound=Result)


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one command produced: its result, or the error that stopped it (`error` then says why,
    in one line a client may read)."""

    value: T | None = None
    error: str | None = None
    error_category: ErrorCategory = ErrorCategory.server
    # A sample that stopped because every consumer of it went away: how many tokens it had decoded.
    decoded_tokens: int = 0

    @classmethod
    def failed(cls, error: str, category: ErrorCategory = ErrorCategory.server, decoded_tokens: int = 0) -> Outcome:
        return cls(error=error, error_category=category, decoded_tokens=decoded_tokens)

    def unwrap(self) -> T:
        """The value of a successful outcome."""
        if self.error is not None or self.value is None:
            raise ValueError(f"the command failed: {self.error}")
        return self.value

    def result(self, model: type[U]) -> U:
        """The value of a successful outcome, which must be a `model` (the command's kind fixes it)."""
        if self.error is not None:
            raise ValueError(f"the command failed: {self.error}")
        if not isinstance(self.value, model):
            raise TypeError(f"expected a {model.__name__}, the command produced {type(self.value).__name__}")
        return self.value
