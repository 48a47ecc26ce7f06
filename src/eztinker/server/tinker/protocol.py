"""Tinker's JSON request bodies, as the official SDK sends them (`tinker` 0.38), and its paths.

Unknown fields are ignored (the SDK adds a `type` tag and fields this server does not use),
except in asample, which refuses any it does not know; defaults are Tinker's, AdamW's included
(`AdamParams.tinker`, types.py). Protobuf bodies are the wire package's.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...types import CHECKPOINT_NAME_PATTERN, RUN_ID_PATTERN, AdamParams
from ..checkpoints import CheckpointKind, kind_of, stored_name, user_name

# A checkpoint saved for sampling (or export) is one of the run's checkpoints, in its kind's
# namespace (checkpoints.py), so that both APIs list it: `tinker://<run>/sampler_weights/<name>` is
# checkpoint `<run>/sampler_weights.<name>`, `tinker://<run>/weights/<name>` is `<run>/<name>`.
_SEGMENT = {
    "weights": CheckpointKind.training,
    "sampler_weights": CheckpointKind.sampler,
    "external_weights": CheckpointKind.external,
}
_SEGMENT_OF = {kind: segment for segment, kind in _SEGMENT.items()}
_TINKER_PATH = re.compile(rf"tinker://({RUN_ID_PATTERN})/(weights|sampler_weights|external_weights)/([^/]+)")


# POST client/config's flags, read by every SDK version (each ignores the ones it lacks); the rest stay at
# their defaults (no zstd, no JWT exchange). SDKs before 0.25 send forward_backward as JSON and call
# /api/v1/forward unless told to send protobuf (which this server reads) and forward through
# forward_backward with forward_only; later SDKs always do both. `TinkerServing.client_config` adds
# the limit on a sampling client's requests in flight.
CLIENT_CONFIG: dict[str, Any] = {"proto_write_fwdbwd": True, "fwd_via_fwdbwd": True}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class CreateSession(_Body):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] = Field(default_factory=dict)
    sdk_version: str | None = None


class SessionRef(_Body):
    session_id: str


class TinkerLora(_Body):
    rank: int = Field(32, ge=1, le=256)
    seed: int | None = Field(None, ge=0)
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class CreateModel(_Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: TinkerLora = Field(default_factory=TinkerLora)
    optimizer_config: dict[str, Any] | None = Field(None, description="Checked by `check_optimizer_config`.")
    user_metadata: dict[str, Any] | None = None


class ModelRef(_Body):
    model_id: str


# The optimizer families of Tinker's SDK (0.38: `AdamOptimizerConfig`, `DimuonOptimizerConfig` at
# create_model and load_weights; `AdamParams`, `DimuonParams` at optim_step) that this server honours:
# AdamW only. Tinker's docs name Dimuon's fields (a momentum, a damped row and column preconditioner,
# a matrix-sign iteration whose count and epsilon are "internal constants") but publish no update rule,
# so it is refused, never approximated.
ADAMW = {"type": "adamw"}
_NO_DIMUON = (
    "Dimuon is not supported by this server: Tinker does not publish its update rule, so it is not "
    "implemented here; create the model with AdamOptimizerConfig (AdamW, the default) and step it with "
    "AdamParams"
)


def check_optimizer_config(config: dict[str, Any] | None, field: str = "optimizer_config") -> None:
    """ValueError naming the field unless `config` selects AdamW (or is absent: AdamW, Tinker's default)."""
    if config is None:
        return
    kind = config.get("type")
    if kind == "dimuon":
        raise ValueError(f"{field}: {_NO_DIMUON}")
    if kind != "adamw":
        raise ValueError(f"{field}.type: optimizer {kind!r} is not supported; this server supports 'adamw'")
    extra = sorted(set(config) - {"type"})
    if extra:
        raise ValueError(f"{field}.{extra[0]}: not a field of AdamOptimizerConfig")


class OptimStep(_Body):
    """The SDK sends AdamParams as `adam_params` and other families (DimuonParams) as `optimizer_params`;
    its own model also reads `optim_params`."""

    model_id: str
    seq_id: int | None = None
    adam_params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None
    optim_params: dict[str, Any] | None = None

    def adam(self) -> AdamParams:
        """The step's AdamW hyperparameters: what the request gives over Tinker's defaults
        (`AdamParams.tinker`); ValueError naming the field for anything else."""
        given = [
            (name, value)
            for name in ("adam_params", "optimizer_params", "optim_params")
            if (value := getattr(self, name)) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"{given[1][0]}: give one of adam_params, optimizer_params, optim_params")
        field, params = given[0] if given else ("adam_params", {})
        kind = params.get("type")
        if kind == "dimuon":
            raise ValueError(f"{field}: {_NO_DIMUON}")
        if kind is not None and kind != "adamw":
            raise ValueError(f"{field}.type: optimizer {kind!r} is not supported; this server supports AdamParams")
        try:
            return AdamParams.tinker({k: v for k, v in params.items() if k != "type"})
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ValueError(f"{field}.{'.'.join(map(str, error['loc']))}: {error['msg']}") from None


class SaveWeights(_Body):
    model_id: str
    path: str
    seq_id: int | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsForSampler(_Body):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: int | None = None
    seq_id: int | None = None
    kind: str = "snapshot"
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None


class SaveWeightsExternal(_Body):
    model_id: str
    path: str
    seq_id: int | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = Field(None, max_length=10)


class CheckpointTtl(_Body):
    ttl_seconds: int | None = None


class LoadWeights(_Body):
    path: str
    optimizer: bool = False
    # load_state: the model to load into; create_training_client_from_state: a new model's session + number.
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = Field(None, ge=0)
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    weights_access_token: str | None = None
    optimizer_config: dict[str, Any] | None = Field(None, description="Checked by `check_optimizer_config`.")


class CreateSamplingSession(_Body):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    model_path: str | None = None
    base_model: str | None = None


class TinkerSamplingParams(_Body):
    model_config = ConfigDict(extra="allow")  # ASample.unsupported refuses what it does not know
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_k: int = Field(-1, ge=-1, description="-1: off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)


MAX_TOPK = 64  # top-k widths (prompt and sampled positions) and prompt_alt_tokens_k


class ASample(_Body):
    """Every field of the SDK's SampleRequest (0.38) is declared: each is honoured or refused by
    name (`unsupported`), and a field this server does not know is refused too, never ignored."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    sampling_session_id: str
    seq_id: int | None = None
    num_samples: int = Field(1, ge=1)
    prompt: dict[str, Any]
    sampling_params: TinkerSamplingParams = Field(default_factory=TinkerSamplingParams)
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(0, ge=0, le=MAX_TOPK)
    topk_sample_logprobs: int = Field(0, ge=0, le=MAX_TOPK)
    target_prompt_logprobs: dict[str, Any] | None = None  # TensorData: wire.decode_target_grid reads it
    prompt_alt_tokens_k: int = Field(0, ge=0, le=MAX_TOPK)
    prompt_logprobs_last_n: int | None = Field(None, ge=1)
    record_stability_info: bool | None = None  # record each sequence for stable_reinforce (provenance.py)
    # A SampleRequest may name its model instead of a sampling session; the SDK sends a session.
    base_model: str | None = None
    model_path: str | None = None
    type: str | None = None

    def unsupported(self) -> str | None:
        """The first field that asks for something this server does not do, with why; None if none."""
        for name in self.model_extra or {}:
            return f"{name} is not a sampling field this server knows; it would be ignored, so it is refused"
        for name in self.sampling_params.model_extra or {}:
            return (
                f"sampling_params.{name} is not a sampling parameter this server knows; it would be ignored, "
                "so it is refused"
            )
        if self.base_model is not None or self.model_path is not None:
            field = "base_model" if self.base_model is not None else "model_path"
            return f"{field}: give the sampling_session_id of a sampling session for it instead"
        if self.prompt_logprobs_last_n is not None and not self.prompt_logprobs:
            return "prompt_logprobs_last_n applies to prompt logprobs: set prompt_logprobs too"
        return None


class RetrieveFuture(_Body):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfo(_Body):
    tinker_path: str


def parse_tinker_path(path: str) -> tuple[str, str]:
    """'tinker://<run>/weights/<name>' (or sampler_weights, external_weights) -> (run_id, our
    checkpoint name); ValueError otherwise."""
    match = _TINKER_PATH.fullmatch(path)
    if match is None or not re.fullmatch(CHECKPOINT_NAME_PATTERN, match[3]) or ".." in match[3]:
        raise ValueError(
            f"{path!r} is not a checkpoint path: expected tinker://<run_id>/weights/<name>, "
            "tinker://<run_id>/sampler_weights/<name> or tinker://<run_id>/external_weights/<name>"
        )
    run_id, segment, name = match.groups()
    return run_id, stored_name(_SEGMENT[segment], name)


def checkpoint_id(name: str) -> tuple[str, str]:
    """Our checkpoint name -> (Tinker's checkpoint_id, checkpoint_type)."""
    kind = kind_of(name)
    return f"{_SEGMENT_OF[kind]}/{user_name(name)}", kind.value


def from_checkpoint_id(checkpoint: str) -> str:
    """Tinker's checkpoint_id ('weights/<name>', 'sampler_weights/<name>', 'external_weights/<name>')
    -> our name; ValueError otherwise."""
    segment, _, name = checkpoint.partition("/")
    if segment not in _SEGMENT or not name or "/" in name:
        raise ValueError(
            f"checkpoint id {checkpoint!r} must be weights/<name>, sampler_weights/<name> or external_weights/<name>"
        )
    return stored_name(_SEGMENT[segment], name)


def tinker_path(run_id: str, name: str) -> str:
    return f"tinker://{run_id}/{checkpoint_id(name)[0]}"
