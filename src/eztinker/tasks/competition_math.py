"""MATH: competition mathematics problems (AMC, AIME, ...) with LaTeX answers in ``\\boxed{}``.

Sources, tried in order: ``data_dir`` (a folder of ``train.jsonl`` / ``test.jsonl``, one
``{"problem": ..., "solution": "... \\\\boxed{\\\\frac{1}{2}}"}`` per line; an ``"answer"`` field,
as in MATH-500, is the gold answer when present), ``$EZTINKER_MATH_DIR``, then the Hub's
``DigitalLearningGmbH/MATH-lighteval`` (7,500 train / 5,000 test; needs `datasets` and network).

The gold is the last ``\\boxed{}`` of the reference solution; a reply is graded by Math-Verify,
which decides LaTeX equivalence (``\\frac{1}{2}`` = ``0.5`` = ``\\dfrac12``).
"""

from __future__ import annotations

import os

from eztinker.tasks._grading import same_number
from eztinker.tasks._problem import Problem
from eztinker.tasks._source import DataSource, check_limit, subset
from eztinker.verify import boxed_span, evaluate_answer, last_boxed, last_number

ANSWER_MARKER = "\\boxed"
ENV_VAR = "EZTINKER_MATH_DIR"
SOURCE = DataSource(
    name="MATH",
    flag="--math-dir",
    env_var=ENV_VAR,
    hub_dataset="DigitalLearningGmbH/MATH-lighteval",
    hub_config=None,
    required=("problem", "solution"),
)
SYSTEM_PROMPT = "Solve the competition math problem step by step. Put the final answer, simplified, in \\boxed{}."


def gold_of(row: dict) -> str:
    """The row's answer: its `answer` field, else the last `\\boxed{}` of its solution."""
    if row.get("answer"):
        return str(row["answer"]).strip()
    boxed = last_boxed(row["solution"])
    if boxed is None:
        raise ValueError(f"MATH solution has no \\boxed{{}} answer: {row['solution'][-80:]!r}")
    return boxed


def load_problems(
    split: str, limit: int | None = None, seed: int = 0, data_dir: str | os.PathLike[str] | None = None
) -> list[Problem]:
    """MATH problems of `split` ("train" or "test"); `limit`: a seeded random subset (a smaller
    limit is a prefix of a larger one). Raises DatasetUnavailableError naming how to fix it."""
    check_limit(limit)
    rows = SOURCE.load_rows(split, data_dir)
    return [
        Problem(
            id=f"math-{split}-{i}", question=rows[i]["problem"], gold=gold_of(rows[i]), solution=rows[i]["solution"]
        )
        for i in subset(len(rows), limit, seed)
    ]


def messages_for(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem.question}]


def is_correct(text: str, problem: Problem) -> bool:
    return bool(evaluate_answer(text, problem.gold)["is_correct"])


def strict_correct(text: str, problem: Problem) -> bool:
    """Right, and the answer is in a closed `\\boxed{}` (what the prompt asks for)."""
    return last_boxed(text) is not None and is_correct(text, problem)


def lenient_correct(text: str, problem: Problem) -> bool:
    """Right by the verifier's reading, or the last number anywhere equals a numeric gold."""
    return is_correct(text, problem) or same_number(last_number(text), problem.gold)


def trim_reply(text: str) -> str:
    """Cut after the line holding the last closed `\\boxed{}`."""
    span = boxed_span(text)
    if span is None:
        return text
    line_end = text.find("\n", span[1])
    return (text if line_end < 0 else text[:line_end]).rstrip()
