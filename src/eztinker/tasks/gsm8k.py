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

import json
import os
import random
import re
from pathlib import Path
from typing import Any

from eztinker.tasks._problem import Problem

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


class DatasetUnavailableError(FileNotFoundError, RuntimeError):
    """GSM8K could not be loaded from any source.

    Subclasses both :class:`FileNotFoundError` and :class:`RuntimeError`, so
    callers may catch either.
    """


def _fix_hint() -> str:
    return (
        "To fix this, do one of:\n"
        "  - pass --gsm8k-dir DIR (data_dir=DIR in Python) with DIR a folder "
        "containing train.jsonl and test.jsonl;\n"
        f"  - set {ENV_VAR}=DIR to such a folder;\n"
        "  - install `datasets` (pip install datasets) and allow network access "
        f"to the Hugging Face Hub (dataset {HUB_DATASET}, config {HUB_CONFIG})."
    )


def _unavailable(problem: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(f"GSM8K data unavailable: {problem}\n{_fix_hint()}")


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise ValueError(f"{path}:{lineno}: expected an object with 'question' and 'answer'")
            rows.append(row)
    return rows


def _rows_from_dir(directory: Path, split: str, origin: str) -> list[dict[str, Any]]:
    path = directory / f"{split}.jsonl"
    if not path.is_file():
        what = "does not exist" if not directory.is_dir() else f"has no {split}.jsonl"
        raise _unavailable(f"{origin} {str(directory)!r} {what}.")
    return _read_jsonl(path)


def _rows_from_hub(split: str) -> tuple[list[dict[str, Any]] | None, str]:
    """Return (rows, "") from the Hub, or (None, reason) if unavailable."""
    try:
        import datasets  # noqa: PLC0415  (optional dependency, imported lazily)
    except ImportError:
        return None, "the `datasets` package is not installed"
    try:
        ds = datasets.load_dataset(HUB_DATASET, HUB_CONFIG, split=split)
        return [{"question": r["question"], "answer": r["answer"]} for r in ds], ""
    except Exception as e:  # network errors, auth, missing cache, ...
        return None, f"loading {HUB_DATASET} from the Hub failed ({type(e).__name__}: {e})"


def _load_rows(split: str, data_dir: str | os.PathLike[str] | None) -> list[dict[str, Any]]:
    if data_dir is not None:
        return _rows_from_dir(Path(data_dir).expanduser(), split, "data_dir")
    env_dir = os.environ.get(ENV_VAR, "").strip()
    if env_dir:
        return _rows_from_dir(Path(env_dir).expanduser(), split, ENV_VAR)
    rows, reason = _rows_from_hub(split)
    if rows is None:
        raise _unavailable(f"no --gsm8k-dir given, {ENV_VAR} is not set, and {reason}.")
    return rows


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
    if split not in SPLITS:
        raise ValueError(f"unknown GSM8K split {split!r}; allowed splits: {', '.join(SPLITS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rows = _load_rows(split, data_dir)
    indices = list(range(len(rows)))
    if limit is not None:
        random.Random(seed).shuffle(indices)
        indices = indices[:limit]
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
