"""A recipe's wall-time budget: work starts only if it is expected to end inside it."""

from __future__ import annotations

import time


class TimeBudget:
    def __init__(self, minutes: float | None):
        self.minutes = minutes
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def allows(self, next_seconds: float) -> bool:
        """Whether work expected to take `next_seconds` (judged by the last such piece) ends in time."""
        return self.minutes is None or self.elapsed() + next_seconds <= self.minutes * 60

    def fraction_used(self) -> float:
        """How much of the budget has passed, 0..1 (0 without a budget)."""
        return 0.0 if self.minutes is None else min(self.elapsed() / (self.minutes * 60), 1.0)
