"""EZTinker: a self-hosted LoRA fine-tuning service for small language models.

The public SDK surface; everything else is internal.
"""

__version__ = "0.1.0"

from .chat import datum_from_messages, datum_from_tokens
from .client._client import APIFuture, ServiceClient, TrainingClient
from .client._custom_loss import CustomLossResult
from .client._errors import APIStatusError, ConnectionFailedError, EZTinkerError, JobFailedError
from .types import (
    AdamParams,
    ChatMessage,
    CheckpointInfo,
    Datum,
    ForwardBackwardResult,
    LoraConfig,
    LossFnInputs,
    ModelInput,
    OptimStepResult,
    Prompt,
    MetricPoint,
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
