"""The shared problem type used by every task module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One task problem.

    Attributes:
        id: Stable identifier, e.g. ``"gsm8k-train-123"`` or ``"arith-test-17"``.
        question: The problem text shown to the model.
        gold: The exact final answer as a string, e.g. ``"72"``.
        solution: A worked solution ending in the task's answer format, if known.
    """

    id: str
    question: str
    gold: str
    solution: str | None = None
