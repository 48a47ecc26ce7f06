"""EZTinker: a self-hosted LoRA fine-tuning service for small language models.

The public SDK surface; everything else is internal.
"""

__version__ = "0.1.0"

import importlib

from .chat import datum_from_messages, datum_from_tokens
from .types import (
    AdamParams,
    ChatMessage,
    CheckpointInfo,
    Datum,
    ForwardBackwardResult,
    LoraConfig,
    LossFnInputs,
    MetricPoint,
    ModelInput,
    OptimStepResult,
    Prompt,
    RunInfo,
    RunMetrics,
    SampledSequence,
    SampleResult,
    SamplingParams,
    ScoreResult,
)

__all__ = [
    # clients
    "ServiceClient",
    "TrainingClient",
    "APIFuture",
    "CustomLossResult",
    # errors
    "EZTinkerError",
    "ConnectionFailedError",
    "APIStatusError",
    "JobFailedError",
    # wire types
    "AdamParams",
    "ChatMessage",
    "CheckpointInfo",
    "Datum",
    "ForwardBackwardResult",
    "LoraConfig",
    "LossFnInputs",
    "ModelInput",
    "OptimStepResult",
    "Prompt",
    "MetricPoint",
    "RunInfo",
    "RunMetrics",
    "SampleResult",
    "SampledSequence",
    "SamplingParams",
    "ScoreResult",
    # example builders
    "datum_from_messages",
    "datum_from_tokens",
    "__version__",
]

# The client's names load on first use: it needs httpx, which the engine alone (a GPU machine
# running bench/gpu_check.py, a Ray worker) does not.
_CLIENT_NAMES = {
    "APIFuture": "_client",
    "ServiceClient": "_client",
    "TrainingClient": "_client",
    "CustomLossResult": "_custom_loss",
    "APIStatusError": "_errors",
    "ConnectionFailedError": "_errors",
    "EZTinkerError": "_errors",
    "JobFailedError": "_errors",
}


def __getattr__(name: str):
    if name in _CLIENT_NAMES:
        value = getattr(importlib.import_module(f".client.{_CLIENT_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
