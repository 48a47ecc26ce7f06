"""The wire schema: every request and response body, shared by the server and the SDK.

Names follow the Tinker SDK where they fit (`Datum`, `ModelInput`, `SamplingParams`,
`AdamParams`, `forward_backward`, `optim_step`). Every model rejects unknown fields, so a
misspelt option is a 422 that names it, never a silently ignored setting.
"""

from __future__ import annotations

import re
import typing
from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Bounds that hold whatever the server's settings say; the server enforces its tighter,
# configurable limits (max tokens, batch sizes) when it validates a request.
MAX_LORA_RANK = 256
CHECKPOINT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# Run ids: ours ('run_<hex>') and the Tinker protocol's ('<session_id>:train:<n>').
RUN_ID_PATTERN = r"[A-Za-z0-9_:-]{1,100}"


class _Schema(BaseModel):
    # NaN/Infinity (which Python's json emits) are refused everywhere: a non-finite learning
    # rate, alpha or weight would silently poison an adapter.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------- runs
class LoraConfig(_Schema):
    rank: int = Field(1, ge=1, le=MAX_LORA_RANK, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    train_unembed: bool = Field(
        False,
        description="Also a LoRA on the output head (lm_head; Tinker's name). Where the head shares its weight "
        "with the input embeddings, the input embeddings stay as they are.",
    )
    target_modules: str | list[str] = Field(
        "all-linear",
        description="'all-linear' (every linear layer but the output head) or module names ([] with train_unembed: "
        "the output head alone).",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        if isinstance(value, list) and not all(v.strip() for v in value):
            raise ValueError("target_modules must not name an empty module")
        if value == [] and not info.data.get("train_unembed"):
            raise ValueError("target_modules must name at least one module (or set train_unembed)")
        return value


class CreateRunRequest(_Schema):
    base_model: str | None = Field(
        None,
        description="One of the server's base models (`GET /v1/info`); default: its first, or the "
        "checkpoint's model when starting from one.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    seed: int = Field(0, ge=0, description="Seed of the adapter's initial weights.")
    from_checkpoint: str | None = Field(
        None, description="Start from this checkpoint ('<run_id>/<name>'), weights and optimizer."
    )


class CheckpointInfo(_Schema):
    run_id: str
    name: str
    path: str
    step: int
    created_at: datetime
    expires_at: datetime | None = Field(None, description="When the server deletes it (None: never).")
    public: bool = Field(False, description="Published: other users of the server may load and sample it.")


class RunInfo(_Schema):
    id: str
    base_model: str
    lora: LoraConfig
    step: int = Field(description="Optimizer steps applied so far.")
    created_at: datetime
    restored_from: str | None = Field(
        None, description="Checkpoint the run's live state was last restored from, if any."
    )
    checkpoints: list[CheckpointInfo] = Field(default_factory=list)
    status: Literal["creating", "working", "idle", "unavailable"] = Field(
        "idle",
        description="creating: its create job has not finished; working: jobs of it are queued or running; "
        "unavailable: this server does not hold its base model.",
    )
    last_loss: float | None = Field(
        None,
        description="Loss per token of its newest training step (its forward_backwards' summed loss over the sum "
        "of their weights: cross_entropy's mean NLL).",
    )
    updated_at: datetime | None = Field(None, description="When it last trained or saved a checkpoint.")


class MetricPoint(_Schema):
    """One optimizer step of a run, from its forward_backwards and its optim_step."""

    step: int = Field(description="The optimizer step (1 is the first): its gradient's batches and its update.")
    loss: float | None = Field(None, description="Summed loss of the step's forward_backwards.")
    num_tokens: int | None = Field(None, description="Positions that carried loss in them.")
    weight_sum: float | None = Field(
        None,
        description="cross_entropy: the sum of the step's weights (other losses: its tokens), the loss's denominator.",
    )
    loss_per_token: float | None = Field(None, description="loss / weight_sum: cross_entropy's mean NLL per token.")
    grad_norm: float | None = Field(None, description="None until the step's optim_step has run.")
    learning_rate: float | None = None
    recorded_at: datetime


class RunMetrics(_Schema):
    run_id: str
    points: list[MetricPoint] = Field(description="One per step, oldest first (after a load, from its checkpoint on).")


# ------------------------------------------------------------------------------------ training
class ModelInput(_Schema):
    tokens: list[int] = Field(min_length=1, description="Token ids fed to the model.")

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls(tokens=list(tokens))


class LossFnInputs(_Schema):
    """Per-position inputs; position i scores `target_tokens[i]` after `model_input.tokens[:i+1]`.

    cross_entropy also takes several targets per position: `target_tokens` and `weights` of
    shape [N, K] (top-k distillation); position i's loss is -sum_k weights[i][k] * logprob(target_tokens[i][k]).
    """

    target_tokens: list[int] | list[list[int]]
    weights: list[float] | list[list[float]] | None = Field(
        None, description="cross_entropy: per-token weight ([N], or [N, K] beside [N, K] target_tokens)."
    )
    logprobs: list[float] | None = Field(None, description="RL losses: the sampler's logprob of each target token.")
    advantages: list[float] | None = Field(None, description="RL losses: per-token advantage.")
    sequence_ratio_mask: list[float] | None = Field(
        None, description="gspo: nonzero at the positions whose log-ratios are averaged into the sequence ratio."
    )

    @property
    def targets_per_position(self) -> int | None:
        """K for [N, K] target_tokens, None for one target a position."""
        first = self.target_tokens[0] if self.target_tokens else None
        return len(first) if isinstance(first, list) else None

    def flat_target_tokens(self) -> list[int]:
        if self.targets_per_position is None:
            return list(self.target_tokens)  # type: ignore[arg-type]
        return [t for row in self.target_tokens for t in row]  # type: ignore[union-attr]

    @model_validator(mode="after")
    def _rectangular(self) -> LossFnInputs:
        k = self.targets_per_position
        if k is not None and (k < 1 or any(not isinstance(r, list) or len(r) != k for r in self.target_tokens)):
            raise ValueError("target_tokens must be [N] or a rectangular [N, K] with K >= 1")
        if self.weights is not None and self.target_tokens:
            w_first = self.weights[0] if self.weights else None
            w_k = len(w_first) if isinstance(w_first, list) else None
            if w_k != k or (k is not None and any(not isinstance(r, list) or len(r) != k for r in self.weights)):
                shape = "[N]" if k is None else f"[N, {k}]"
                raise ValueError(f"weights must have the shape of target_tokens ({shape})")
        return self


class Datum(_Schema):
    model_input: ModelInput
    loss_fn_inputs: LossFnInputs

    @model_validator(mode="after")
    def _aligned(self) -> Datum:
        n = len(self.model_input.tokens)
        inputs = self.loss_fn_inputs
        for name in ("target_tokens", "weights", "logprobs", "advantages", "sequence_ratio_mask"):
            values = getattr(inputs, name)
            if values is not None and len(values) != n:
                raise ValueError(
                    f"loss_fn_inputs.{name} has {len(values)} entries but "
                    f"model_input.tokens has {n}; they must be the same length"
                )
        return self


LossFnName = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"]
LOSS_FNS: tuple[str, ...] = typing.get_args(LossFnName)


class ForwardBackwardRequest(_Schema):
    data: list[Datum] = Field(min_length=1)
    loss_fn: LossFnName = "cross_entropy"
    loss_fn_config: dict[str, float] | None = Field(
        None,
        description="ppo/cispo/gspo: clip_low_threshold, clip_high_threshold (ratio bounds, default 0.8 and 1.2); "
        "dro: beta (default 0.05); stable_reinforce: max_weight (the importance weight's cap, default 2).",
    )

    @model_validator(mode="after")
    def _inputs_for_loss(self) -> ForwardBackwardRequest:
        for i, datum in enumerate(self.data):
            inputs = datum.loss_fn_inputs
            if self.loss_fn != "cross_entropy" and inputs.targets_per_position is not None:
                raise ValueError(
                    f"data[{i}].loss_fn_inputs.target_tokens is [N, K]; only cross_entropy takes "
                    f"several targets a position, {self.loss_fn} takes [N]"
                )
            if self.loss_fn != "gspo" and inputs.sequence_ratio_mask is not None:
                raise ValueError(f"data[{i}].loss_fn_inputs.sequence_ratio_mask is only taken by gspo")
            if self.loss_fn == "cross_entropy":
                continue  # weights are optional: every position counts without them
            required = ("logprobs", "advantages") + (("sequence_ratio_mask",) if self.loss_fn == "gspo" else ())
            for name in required:
                if getattr(inputs, name) is None:
                    raise ValueError(f"data[{i}].loss_fn_inputs.{name} is required by {self.loss_fn}")
        return self


class ForwardBackwardResult(_Schema):
    loss: float = Field(description="Summed loss over the batch (cross_entropy: weighted NLL).")
    num_tokens: int = Field(description="Positions that carried loss (nonzero weight/advantage).")
    logprobs: list[list[float | None] | list[list[float | None]]] = Field(
        description="Per datum and position, logprob of the target token ([N, K] for [N, K] targets); null "
        "where the loss "
        "had zero weight (those logits are not computed unless every position's logprob is asked for, "
        "as the Tinker protocol does)."
    )


class AdamParams(_Schema):
    """AdamW's hyperparameters for one optimizer step: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    p <- p (1 - lr wd) - lr m^ / (sqrt(v^) + eps) (bias-corrected m^, v^; decoupled weight decay, as in
    torch's AdamW and Tinker's), after the gradient's global norm is clipped to `grad_clip_norm`.

    The one parameter model of every door; only the defaults of the fields a request leaves out
    differ, each as its protocol documents them:
    - REST (`POST /v1/runs/{id}/optim_step`, this package's SDK): the field defaults below (torch's
      AdamW's betas and eps; the gradient norm clipped at 1.0).
    - Tinker (`POST /api/v1/optim_step`, `tinker.types.AdamParams`): `TINKER_ADAM_DEFAULTS` (beta2
      0.95, eps 1e-12, no clipping), applied by `AdamParams.tinker` in server/tinker/protocol.py.
    """

    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="Decoupled: a step scales the weights by 1 - lr * weight_decay.")
    grad_clip_norm: float | None = Field(
        1.0, ge=0, description="Clip the adapter's gradient norm to this; 0 or null disables clipping (Tinker sends 0)."
    )

    @classmethod
    def tinker(cls, given: dict[str, Any]) -> AdamParams:
        """The fields a Tinker request gives, over Tinker's defaults for the rest; unknown fields are refused."""
        return cls.model_validate({**TINKER_ADAM_DEFAULTS, **given})

    @property
    def clip_norm(self) -> float | None:
        """The norm the gradient is clipped to, None for none."""
        return self.grad_clip_norm or None


# tinker.types.AdamParams' defaults (SDK 0.38, and Tinker's docs): where they differ from REST's.
TINKER_ADAM_DEFAULTS: dict[str, Any] = {"beta2": 0.95, "eps": 1e-12, "grad_clip_norm": 0.0}


class OptimStepRequest(_Schema):
    adam_params: AdamParams = Field(default_factory=AdamParams)


class OptimStepResult(_Schema):
    step: int
    grad_norm: float
    learning_rate: float


# ------------------------------------------------------------------------------------ sampling
class ChatMessage(_Schema):
    role: Literal["system", "user", "assistant"]
    content: str


class Prompt(_Schema):
    """Exactly one of: token ids, chat messages (the server applies the chat template), text."""

    tokens: list[int] | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    text: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Prompt:
        given = [k for k in ("tokens", "messages", "text") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of tokens, messages or text (got {given or 'none'})")
        return self


class SamplingParams(_Schema):
    max_tokens: int = Field(64, ge=1, description="New tokens at most, per candidate.")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    stop: list[str] = Field(
        default_factory=list, description="Stop strings (the model's end-of-turn token always stops)."
    )
    stop_token_ids: list[int] = Field(
        default_factory=list, description="Token ids that also stop a candidate (included in its tokens)."
    )
    seed: int | None = Field(None, ge=0, description="Makes sampling reproducible.")
    # As vLLM defines them (its SamplingParams), for the OpenAI door's clients that send them.
    min_p: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Drop tokens less likely than min_p x the most likely one (after temperature); 0 disables it.",
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="Divides the positive logits (multiplies the negative ones) of tokens "
        "already in the prompt or the candidate; > 1 discourages repeats, 1 disables it.",
    )
    min_tokens: int = Field(0, ge=0, description="No stop (stop token or string) before this many new tokens.")
    ignore_eos: bool = Field(
        False,
        description="The model's end-of-turn/end-of-text tokens do not stop a candidate (only stop, "
        "stop_token_ids and max_tokens do): Tinker's stop=[], vLLM's ignore_eos.",
    )

    @model_validator(mode="after")
    def _min_tokens_within_max(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self

    @field_validator("stop")
    @classmethod
    def _stops_non_empty(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class SampleRequest(_Schema):
    base_model: str | None = Field(
        None, description="Bare-model sampling only: which base model (default: the server's first)."
    )
    prompts: list[Prompt] = Field(min_length=1)
    num_samples: int = Field(1, ge=1, description="Candidates per prompt.")
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)


class SampledSequence(_Schema):
    text: str
    tokens: list[int]
    logprobs: list[float] = Field(description="Model logprob (temperature 1) of each sampled token.")
    stop_reason: Literal["stop", "length"]
    top_logprobs: list[list[tuple[int, float]]] | None = Field(
        None, description="When asked for: at each sampled position, the k most likely (token, logprob)."
    )


class SampledToken(typing.NamedTuple):
    """A candidate's newest token, reported while a sample decodes (for streaming; not on the wire)."""

    prompt: int  # the prompt's index within its request
    sample: int  # the candidate's index among its prompt's
    token: int
    logprob: float
    top: list[tuple[int, float]] | None  # the k most likely (token, logprob), when asked for
    stop_reason: str | None  # set on the candidate's last token: 'stop' or 'length'


class SampleResult(_Schema):
    prompt_tokens: list[list[int]]
    sequences: list[list[SampledSequence]] = Field(description="Per prompt, its candidates.")


class ScoreRequest(_Schema):
    prompt: Prompt
    responses: list[str] = Field(min_length=1)


class ResponseScore(_Schema):
    mean_logprob: float
    sum_logprob: float
    num_tokens: int


class ScoreResult(_Schema):
    scores: list[ResponseScore]


# --------------------------------------------------------------------------------- checkpoints
class SaveRequest(_Schema):
    name: str = Field(pattern=CHECKPOINT_NAME_PATTERN, description="Letters, digits, '_', '.', '-'.")

    @field_validator("name")
    @classmethod
    def _no_dots(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("checkpoint name must not contain '..'")
        return value


class LoadRequest(_Schema):
    checkpoint: str = Field(
        description="'<name>' of this run or '<run_id>/<name>' of another run you own.",
        max_length=300,
    )

    @field_validator("checkpoint")
    @classmethod
    def _reference(cls, value: str) -> str:
        parse_checkpoint_ref(value, default_run="_")
        return value


def parse_checkpoint_ref(ref: str, default_run: str) -> tuple[str, str]:
    """'<run_id>/<name>' or '<name>' -> (run_id, name); refuses anything path-like."""
    parts = ref.split("/")
    if len(parts) == 1:
        run_id, name = default_run, parts[0]
    elif len(parts) == 2:
        run_id, name = parts
    else:
        raise ValueError("checkpoint must be '<name>' or '<run_id>/<name>'")
    if not re.fullmatch(CHECKPOINT_NAME_PATTERN, name) or ".." in name:
        raise ValueError(f"invalid checkpoint name {name!r}")
    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise ValueError(f"invalid run id {run_id!r}")
    return run_id, name


# ---------------------------------------------------------------------------------------- jobs
class JobStatus(str, Enum):
    pending = "pending"
    running = "running"
    completed = "completed"
    failed = "failed"


class JobRef(_Schema):
    job_id: str
    status: JobStatus


class JobInfo(_Schema):
    id: str
    run_id: str | None
    kind: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    error: str | None = None


class WorkerStatus(_Schema):
    """One engine worker: its base model, whether it is alive, the runs placed on it."""

    name: str
    model: str
    alive: bool
    runs: list[str]


class HealthInfo(_Schema):
    """Liveness. A server with API keys answers only `status` (and `worker`) to a request without a valid one."""

    status: Literal["ok", "degraded"] = Field("ok", description="'degraded' while the worker is not 'ok'.")
    worker: str | None = Field(
        None,
        description="The job worker: 'ok', 'stalled: <why>' (e.g. the database is locked by "
        "another process; jobs resume when it is not) or 'stopped: <why>' (no job will run: HTTP 503).",
    )
    model: str | None = Field(None, description="The default base model.")
    models: list[str] | None = Field(None, description="Every base model the server holds.")
    runs: int | None = None
    queued_jobs: int | None = None
    version: str | None = None
    workers: list[WorkerStatus] | None = Field(
        None, description="The engine workers of a backend that has several (Ray), with the runs placed on each."
    )


class EvaluationReport(_Schema):
    """A harness's results for one of a run's adapters (`eztinker eval` and the recipes' --eval-tasks send them)."""

    checkpoint: str | None = Field(None, max_length=200, description="The checkpoint's name; None: the live adapter.")
    harness: str = Field("lm-eval", max_length=100, description="What produced the scores, e.g. 'lm-eval 0.4.13'.")
    tasks: list[str] = Field(min_length=1, max_length=1000)
    scores: dict[str, dict[str, float | None]] = Field(
        description="Per task, its metrics as the harness names them (e.g. {'arc_easy': {'acc,none': 0.25}})."
    )
    config: dict[str, Any] = Field(default_factory=dict, description="limit, few-shot count and the like.")


class EvaluationInfo(EvaluationReport):
    id: str
    run_id: str
    step: int = Field(description="The adapter's optimizer step: the checkpoint's, or the run's when reported.")
    created_at: datetime
