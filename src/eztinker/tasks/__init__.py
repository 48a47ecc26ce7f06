"""Tasks: problem sets with exact answers plus the prompt used to pose them.

Every task module exposes:

* ``load_problems(split, limit=None, seed=0, ...) -> list[Problem]``
* ``messages_for(problem) -> list[dict]`` — a system message with the
  instruction, optionally worked examples, then the user question (ending on
  the user's turn)
* ``ANSWER_MARKER`` — the answer format the prompt asks for
* ``is_correct``, ``strict_correct``, ``lenient_correct``, ``trim_reply`` — grading (see
  ``_grading.py``)

Tasks with files take ``data_dir`` (GSM8K, MATH, AQuA-RAT: local JSONL, else an environment
variable's folder, else the Hub); the arithmetic task is generated and takes ``difficulty``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol, cast

from eztinker.tasks._problem import Problem


class Task(Protocol):
    """What a recipe uses of a task (each task module is one)."""

    ANSWER_MARKER: str
    # (split, limit=None, seed=0, **the task's data options) -> problems
    load_problems: Callable[..., list[Problem]]

    def messages_for(self, problem: Problem) -> list[dict[str, str]]: ...
    def is_correct(self, text: str, problem: Problem) -> bool: ...
    def strict_correct(self, text: str, problem: Problem) -> bool: ...
    def lenient_correct(self, text: str, problem: Problem) -> bool: ...
    def trim_reply(self, text: str) -> str: ...


# Task name -> module ("math" would shadow the standard library's module of that name).
_MODULES = {"gsm8k": "gsm8k", "arithmetic": "arithmetic", "math": "competition_math", "aqua": "aqua"}
TASK_NAMES: tuple[str, ...] = tuple(_MODULES)


def get_task(name: str) -> Task:
    """Return the task module for ``name`` (one of TASK_NAMES)."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return cast(Task, importlib.import_module(f"eztinker.tasks.{_MODULES[name]}"))


__all__ = ["Problem", "TASK_NAMES", "Task", "get_task"]
