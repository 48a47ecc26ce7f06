"""What the cookbook recipe tests share: reading a recipe's JSONL logs, and timing its runs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class RecipeTimes:
    """Wall seconds of each recipe run in a test module, printed once at its end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def timed(self, name: str, run: Callable[[], object]) -> None:
        start = time.perf_counter()
        run()
        self.seconds[name] = time.perf_counter() - start

    def report(self) -> None:
        print("\nrecipe run times (s):", json.dumps({k: round(v, 1) for k, v in self.seconds.items()}))
