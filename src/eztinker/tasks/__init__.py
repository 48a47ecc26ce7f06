"""Tasks: problem sets with exact answers plus the prompt used to pose them.

Every task module exposes:

* ``load_problems(split, limit=None, seed=0, ...) -> list[Problem]``
* ``messages_for(problem) -> list[dict]`` — a system message with the
  instruction, optionally worked examples, then the user question (ending on
  the user's turn)
* ``ANSWER_MARKER`` — the answer format the prompt asks for
"""

from __future__ import annotations

import importlib
from types import ModuleType

from eztinker.tasks._problem import Problem

TASK_NAMES: tuple[str, ...] = ("gsm8k", "arithmetic")


def get_task(name: str) -> ModuleType:
    """Return the task module for ``name`` ("gsm8k" or "arithmetic")."""
    if name not in TASK_NAMES:
        raise ValueError(
            f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}"
        )
    return importlib.import_module(f"eztinker.tasks.{name}")


__all__ = ["Problem", "TASK_NAMES", "get_task"]
