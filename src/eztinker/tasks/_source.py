"""Where a task's rows come from: a local folder of JSONL files, a folder named by an environment
variable, or the Hugging Face Hub (the optional `datasets` package), tried in that order.

If none works, :class:`DatasetUnavailableError` says how to fix it: which flag, which variable,
which files, which Hub dataset.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DatasetUnavailableError(FileNotFoundError, RuntimeError):
    """A task's data could not be loaded from any source.

    Subclasses both :class:`FileNotFoundError` and :class:`RuntimeError`, so callers may catch either.
    """


@dataclass(frozen=True)
class DataSource:
    """One task's sources. Rows from files and from the Hub both pass `required` keys."""

    name: str  # "GSM8K", shown in messages
    flag: str  # "--gsm8k-dir"
    env_var: str  # "EZTINKER_GSM8K_DIR"
    hub_dataset: str
    hub_config: str | None
    required: tuple[str, ...]
    splits: tuple[str, ...] = ("train", "test")
    hub_splits: Mapping[str, str] = field(default_factory=dict)  # our split -> the Hub's, where they differ

    def fix_hint(self) -> str:
        config = f", config {self.hub_config}" if self.hub_config else ""
        files = " and ".join(f"{s}.jsonl" for s in self.splits)
        return (
            "To fix this, do one of:\n"
            f"  - pass {self.flag} DIR (data_dir=DIR in Python) with DIR a folder containing {files};\n"
            f"  - set {self.env_var}=DIR to such a folder;\n"
            "  - install `datasets` (pip install datasets) and allow network access "
            f"to the Hugging Face Hub (dataset {self.hub_dataset}{config})."
        )

    def unavailable(self, problem: str) -> DatasetUnavailableError:
        return DatasetUnavailableError(f"{self.name} data unavailable: {problem}\n{self.fix_hint()}")

    def load_rows(self, split: str, data_dir: str | os.PathLike[str] | None) -> list[dict[str, Any]]:
        """The rows of `split`: from `data_dir`, else the environment variable's folder, else the Hub."""
        if split not in self.splits:
            raise ValueError(f"unknown {self.name} split {split!r}; allowed splits: {', '.join(self.splits)}")
        if data_dir is not None:
            return self._rows_from_dir(Path(data_dir).expanduser(), split, "data_dir")
        env_dir = os.environ.get(self.env_var, "").strip()
        if env_dir:
            return self._rows_from_dir(Path(env_dir).expanduser(), split, self.env_var)
        rows, reason = self._rows_from_hub(split)
        if rows is None:
            raise self.unavailable(f"no {self.flag} given, {self.env_var} is not set, and {reason}.")
        return rows

    def _rows_from_dir(self, directory: Path, split: str, origin: str) -> list[dict[str, Any]]:
        path = directory / f"{split}.jsonl"
        if not path.is_file():
            what = "does not exist" if not directory.is_dir() else f"has no {split}.jsonl"
            raise self.unavailable(f"{origin} {str(directory)!r} {what}.")
        return read_jsonl(path, self.required)

    def _rows_from_hub(self, split: str) -> tuple[list[dict[str, Any]] | None, str]:
        """(rows, "") from the Hub, or (None, reason) if unavailable."""
        try:
            import datasets  # noqa: PLC0415  (optional dependency, imported lazily)
        except ImportError:
            return None, "the `datasets` package is not installed"
        try:
            ds = datasets.load_dataset(self.hub_dataset, self.hub_config, split=self.hub_splits.get(split, split))
            return [{k: r[k] for k in self.required} for r in ds], ""
        except Exception as e:  # network errors, auth, missing cache, ...
            return None, f"loading {self.hub_dataset} from the Hub failed ({type(e).__name__}: {e})"


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """One object per non-blank line, each with the `required` keys; ValueError naming file and line."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or any(k not in row for k in required):
                raise ValueError(f"{path}:{lineno}: expected an object with {' and '.join(map(repr, required))}")
            rows.append(row)
    return rows


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


def subset(count: int, limit: int | None, seed: int) -> list[int]:
    """Indices of a deterministic random subset of `limit` rows (same seed, same subset; a smaller
    limit gives a prefix of a larger one); every row in order when `limit` is None."""
    indices = list(range(count))
    if limit is not None:
        random.Random(seed).shuffle(indices)
        indices = indices[:limit]
    return indices
