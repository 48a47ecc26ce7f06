"""Model computation only: no HTTP, no database, no job ids."""

from .engine import Engine, EngineError
from .models import BaseModel, ModelLoadError, load_base_model
from .sampler import SampleSpec

__all__ = ["BaseModel", "Engine", "EngineError", "ModelLoadError", "SampleSpec", "load_base_model"]
