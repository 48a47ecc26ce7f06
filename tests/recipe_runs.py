"""What the cookbook recipe tests share: their server process, the cookbook set up offline against
it, reading a recipe's JSONL logs, and timing its runs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from eztinker.launcher import ServerProcess, offline_env


def recipe_server(
    root: Path, models: Sequence[str], extra_args: Sequence[str] = (), startup_timeout: float = 120
) -> ServerProcess:
    """A running `eztinker server` process on the CPU serving `models`, with its data and log under
    `root` (a context manager that stops it)."""
    return ServerProcess(
        model=list(models),
        data_dir=root / "data",
        log_file=root / "server.log",
        extra_args=["--device", "cpu", *extra_args],
        env=offline_env(),
        startup_timeout=startup_timeout,
        poll_interval=0.05,
    )


def offline_cookbook(monkeypatch, base_url: str, tokenizers: Mapping[str, object] | None = None) -> None:
    """Point the cookbook at `base_url` without the internet: no telemetry, no Hub, no price list,
    and each served name's tokenizer from `tokenizers` (the registry calls its factory at every
    look-up, so the factory returns one loaded tokenizer)."""
    import tinker_cookbook.utils.cost_estimation as cost_estimation
    from tinker_cookbook import tokenizer_utils

    monkeypatch.setenv("TINKER_BASE_URL", base_url)
    monkeypatch.setenv("TINKER_API_KEY", "tml-cookbook")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(cost_estimation, "_pricing_fetched", True)  # its price list is on the internet
    for name, tokenizer in (tokenizers or {}).items():
        monkeypatch.setitem(tokenizer_utils._CUSTOM_TOKENIZER_REGISTRY, name, lambda tokenizer=tokenizer: tokenizer)


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
