"""GSM8K grade-school math word problems.

Data sources, tried in order:

1. an explicit ``data_dir`` argument (a folder holding ``train.jsonl`` and
   ``test.jsonl``, one ``{"question": ..., "answer": "...\\n#### 72"}`` per line);
2. the environment variable ``EZTINKER_GSM8K_DIR`` (same layout);
3. the Hugging Face Hub dataset ``openai/gsm8k`` (config ``main``), which needs
   the optional ``datasets`` package and network access.

If none works, :class:`DatasetUnavailableError` is raised with a message that
says how to fix it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from eztinker.tasks._grading import NumericAnswers
from eztinker.tasks._problem import Problem
from eztinker.tasks._source import DatasetUnavailableError as DatasetUnavailableError  # callers catch it from here
from eztinker.tasks._source import DataSource, check_limit, subset

ANSWER_MARKER = "####"
ENV_VAR = "EZTINKER_GSM8K_DIR"
HUB_DATASET = "openai/gsm8k"
HUB_CONFIG = "main"
SPLITS: tuple[str, ...] = ("train", "test")

SYSTEM_PROMPT = (
    "Solve the math problem step by step. "
    "End your response with the final answer on its own line, "
    "in the form `#### <number>`."
)

_CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")


SOURCE = DataSource(
    name="GSM8K",
    flag="--gsm8k-dir",
    env_var=ENV_VAR,
    hub_dataset=HUB_DATASET,
    hub_config=HUB_CONFIG,
    required=("question", "answer"),
    splits=SPLITS,
)


def find_shared_gsm8k_dir() -> Path | None:
    """Return ``<project root>/../shared/data/gsm8k`` if that folder exists.

    The project root is the nearest ancestor of this file holding a
    ``pyproject.toml``. Returns ``None`` if there is no such root or folder.
    """
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            candidate = parent.parent / "shared" / "data" / "gsm8k"
            return candidate if candidate.is_dir() else None
    return None


def parse_gold(answer: str) -> str:
    """Extract the final answer after ``####`` from a GSM8K answer, commas removed."""
    if ANSWER_MARKER not in answer:
        raise ValueError(f"GSM8K answer has no {ANSWER_MARKER!r} line: {answer[-80:]!r}")
    return answer.rsplit(ANSWER_MARKER, 1)[1].strip().replace(",", "")


def _clean_solution(answer: str) -> str:
    """Drop GSM8K calculator annotations like ``<<48/2=24>>``."""
    return _CALC_ANNOTATION.sub("", answer).strip()


def load_problems(
    split: str,
    limit: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> list[Problem]:
    """Load GSM8K problems.

    Args:
        split: "train" or "test".
        limit: If given, a deterministic random subset of this size (same seed,
            same subset; a smaller limit gives a prefix of a larger one).
            ``None`` returns every problem in file order.
        seed: Seed for choosing the subset.
        data_dir: Folder with ``train.jsonl``/``test.jsonl``; overrides the
            environment variable and the Hub.

    Raises:
        ValueError: unknown split or negative limit.
        DatasetUnavailableError: no source could provide the data.
    """
    check_limit(limit)
    rows = SOURCE.load_rows(split, data_dir)
    indices = subset(len(rows), limit, seed)
    problems = []
    for i in indices:
        answer = rows[i]["answer"]
        problems.append(
            Problem(
                id=f"gsm8k-{split}-{i}",
                question=rows[i]["question"],
                gold=parse_gold(answer),
                solution=_clean_solution(answer),
            )
        )
    return problems


def messages_for(problem: Problem) -> list[dict[str, str]]:
    """Chat messages posing ``problem``: the system instruction, then the question."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": problem.question},
    ]


_answers = NumericAnswers(ANSWER_MARKER)
is_correct = _answers.is_correct
strict_correct = _answers.strict_correct
lenient_correct = _answers.lenient_correct
trim_reply = _answers.trim_reply
