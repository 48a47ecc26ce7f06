"""The service every router calls (facade.py), and what it refuses with (errors.py)."""

from __future__ import annotations

from .core import MAX_SEED, _request_hash
from .errors import LimitExceeded, ServiceError, invalid, not_found
from .facade import Service
from .work import MAX_PROMPT_CELLS_PER_TOKEN

__all__ = [
    "MAX_PROMPT_CELLS_PER_TOKEN",
    "MAX_SEED",
    "LimitExceeded",
    "Service",
    "ServiceError",
    "_request_hash",
    "invalid",
    "not_found",
]
