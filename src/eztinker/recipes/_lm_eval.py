"""`--eval-tasks`: lm-evaluation-harness tasks beside a recipe's own held-out accuracy, at every
evaluation, on the run's live adapter (see `eztinker.evaluation`). Each result goes into the
epoch's entry (`lm_eval`: task -> metrics), its JSON under `<output_dir>/lm_eval/`, and the
server's record of the run's evaluations (the dashboard's run page)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .. import TrainingClient


def lm_eval_tasks(config: Any) -> list[str]:
    return [t.strip() for t in (config.eval_tasks or "").split(",") if t.strip()]


def evaluate_with_lm_eval(
    config: Any, run: TrainingClient, entry: dict[str, Any], times: dict[str, float], output_dir: Path, console: Console
) -> None:
    """With --eval-tasks, lm-eval's scores of the run's adapter as it is now into `entry`."""
    tasks = lm_eval_tasks(config)
    if not tasks:
        return
    from ..evaluation import evaluate

    t = time.monotonic()
    outcome = evaluate(
        config.server_url,
        run.run_id,
        tasks,
        limit=config.eval_limit,
        include_path=config.eval_include_path,
        api_key=config.api_key,
        output_dir=output_dir / "lm_eval",
        seed=config.seed,
    )
    entry["lm_eval"] = outcome.scores
    times["lm_eval"] = time.monotonic() - t
    console.print(f"lm-eval, epoch {entry['epoch']} ({outcome.seconds:.0f} s):")
    console.print(outcome.table, markup=False, highlight=False)
