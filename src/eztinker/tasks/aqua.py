"""AQuA-RAT: algebra word problems, multiple choice with options A-E and a worked rationale.

Sources, tried in order: ``data_dir`` (``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl``,
one ``{"question": ..., "options": ["A)21", "B)25", ...], "rationale": ..., "correct": "B"}`` per
line, the Hub's own layout), ``$EZTINKER_AQUA_DIR``, then the Hub's ``deepmind/aqua_rat``
(config ``raw``: 97,467 train / 254 validation / 254 test; needs `datasets` and network).

A reply is right when the option letter it picks is the gold one; the prompt asks for
``Answer: <letter>``.
"""

from __future__ import annotations

import os
import re

from eztinker.tasks._problem import Problem
from eztinker.tasks._source import DataSource, check_limit, subset
from eztinker.verify import last_option_letter, option_letter, strict_option

ANSWER_MARKER = "Answer:"
ENV_VAR = "EZTINKER_AQUA_DIR"
SOURCE = DataSource(
    name="AQuA-RAT",
    flag="--aqua-dir",
    env_var=ENV_VAR,
    hub_dataset="deepmind/aqua_rat",
    hub_config="raw",
    required=("question", "options", "rationale", "correct"),
    splits=("train", "validation", "test"),
)
SYSTEM_PROMPT = (
    "Solve the multiple-choice problem. Think briefly, then give the letter of the correct "
    "option on its own line as `Answer: <letter>`."
)
LETTERS = "ABCDE"


def _problem(split: str, i: int, row: dict) -> Problem:
    correct = str(row["correct"]).strip().upper()
    if correct not in LETTERS:
        raise ValueError(f"AQuA-RAT {split} row {i}: 'correct' must be one of A-E, got {row['correct']!r}")
    options = "\n".join(re.sub(r"^\s*([A-E])\s*\)\s*", r"\1) ", str(o)) for o in row["options"])
    return Problem(
        id=f"aqua-{split}-{i}",
        question=f"{row['question'].strip()}\nOptions:\n{options}",
        gold=correct,
        solution=f"{row['rationale'].strip()}\n{ANSWER_MARKER} {correct}",
    )


def load_problems(
    split: str, limit: int | None = None, seed: int = 0, data_dir: str | os.PathLike[str] | None = None
) -> list[Problem]:
    """AQuA-RAT problems of `split` ("train", "validation" or "test"), the options listed in the
    question; `limit`: a seeded random subset. Raises DatasetUnavailableError naming how to fix it."""
    check_limit(limit)
    rows = SOURCE.load_rows(split, data_dir)
    return [_problem(split, i, rows[i]) for i in subset(len(rows), limit, seed)]


def messages_for(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem.question}]


def is_correct(text: str, problem: Problem) -> bool:
    return option_letter(text) == problem.gold


def strict_correct(text: str, problem: Problem) -> bool:
    return strict_option(text, ANSWER_MARKER) == problem.gold


def lenient_correct(text: str, problem: Problem) -> bool:
    return last_option_letter(text) == problem.gold


def trim_reply(text: str) -> str:
    """Cut after the `Answer: <letter>` line."""
    match = re.search(re.escape(ANSWER_MARKER) + r"[\s*]*\(?[A-E]\b[^\n]*", text)
    return text[: match.end()].rstrip() if match else text
