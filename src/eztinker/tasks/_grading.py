"""How a task grades a reply. Every task module exposes four functions of (reply text, problem):

* ``is_correct`` — the verifier (Math-Verify where the answer is mathematical): the reward;
* ``strict_correct`` — right *and* in the format the prompt asks for (e.g. ``Answer: 42``);
* ``lenient_correct`` — right by the loosest reading (e.g. the last number anywhere);
* ``trim_reply`` (text only) — the reply cut after its answer line: what follows is rambling
  that training should not reinforce.

`NumericAnswers` implements them for tasks whose gold answer is a number and whose prompt asks
for ``<marker> <number>`` (GSM8K, arithmetic).
"""

from __future__ import annotations

import math
import re

from eztinker.tasks._problem import Problem
from eztinker.verify import evaluate_answer, last_number, strict_answer


def same_number(value: str | float | None, gold: str) -> bool:
    try:
        return value is not None and math.isclose(float(value), float(gold), rel_tol=1e-6, abs_tol=1e-9)
    except ValueError:
        return False


def trim_after_answer(text: str, marker: str) -> str:
    """Cut a reply after its `<marker> <number>` line."""
    match = re.search(re.escape(marker) + r"\s*\$?-?[\d,]*\.?\d+[^\n]*", text)
    return text[: match.end()].rstrip() if match else text


class NumericAnswers:
    def __init__(self, marker: str):
        self.marker = marker

    def is_correct(self, text: str, problem: Problem) -> bool:
        return bool(evaluate_answer(text, problem.gold)["is_correct"])

    def strict_correct(self, text: str, problem: Problem) -> bool:
        return same_number(strict_answer(text, self.marker), problem.gold)

    def lenient_correct(self, text: str, problem: Problem) -> bool:
        return same_number(last_number(text), problem.gold)

    def trim_reply(self, text: str) -> str:
        return trim_after_answer(text, self.marker)
