"""The engine's errors: requests it cannot carry out, with messages fit for the client."""

from __future__ import annotations


class EngineError(ValueError):
    """A request the engine cannot carry out (unknown run, mismatched checkpoint, NaN loss...)."""


class InvalidTarget(EngineError):
    """A LoRA target module the model cannot take; `index` is its position in the list (None:
    the whole `target_modules` value)."""

    def __init__(self, index: int | None, message: str):
        super().__init__(message)
        self.index = index
