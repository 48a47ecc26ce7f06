"""The bookkeeping every recipe shares around its own loop body: the results file (a resumed run
keeps its earlier epochs), the first evaluation, the time budget, the evaluation cadence, the
per-epoch checkpoint, the final evaluation of the last adapter, the best epoch, the table and the
plot. A recipe's loop stays its own and reads top to bottom:

    log = EpochLog(config, FILES, console, rollouts, report=...)
    results = log.start(run, model, start_epoch, test)
    for epoch in log.epochs(start_epoch):
        ...sample, select, train...
        log.end_epoch(run, entry, test)
    return log.finish(run, test, title, rows, series)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from rich.console import Console

from .. import TrainingClient
from ..tasks import Problem
from ._budget import TimeBudget
from ._lm_eval import evaluate_with_lm_eval
from ._results import (
    TEST_ROWS,
    TEST_SERIES,
    config_dict,
    plot_curves,
    previous_results,
    print_best,
    print_epoch_table,
    record_best,
    save_results,
)
from ._rollouts import Rollouts


class EpochMetrics(TypedDict, total=False):
    """What every recipe records per epoch (epoch 0: before training); each recipe adds its own
    metrics (train accuracy, losses, pairs, rewards) beside these."""

    epoch: int
    seconds: dict[str, float]  # wall time per phase: sample, train, eval, lm_eval, ...
    learning_rate: float
    optimizer_steps: int
    test_accuracy: float
    test_strict_accuracy: float
    test_lenient_accuracy: float
    lm_eval: dict[str, dict[str, float | None]]
    checkpoint: str  # '<run_id>/<prefix><epoch>'
    checkpoint_path: str
    partial: bool  # stopped inside the epoch: by the time budget, or by steps with nothing to learn (RL)


@dataclass(frozen=True)
class RecipeFiles:
    """A recipe's names: its results file, its plot and its epoch checkpoints' prefix."""

    results: str
    plot: str
    checkpoint_prefix: str


class EpochLog:
    def __init__(
        self,
        config: Any,
        files: RecipeFiles,
        console: Console,
        rollouts: Rollouts,
        *,
        report: Callable[[dict[str, Any]], None],
    ):
        self.config, self.files, self.console, self.rollouts = config, files, console, rollouts
        self.output_dir = Path(config.output_dir)
        self.path = self.output_dir / files.results
        self.report = report
        self.budget = TimeBudget(config.time_budget_minutes)
        self.results: dict[str, Any] = {"epochs": []}

    def start(self, run: TrainingClient, model: str, start_epoch: int, test: list[Problem]) -> dict[str, Any]:
        """The results so far (a resumed run's earlier epochs), with the untrained adapter's
        evaluation as epoch 0 when training starts from scratch and there is a test set."""
        c = self.config
        if c.resume_from:
            self.results = previous_results(self.path, c.resume_from, self.files.checkpoint_prefix)
        self.results.update(config=config_dict(c, drop=("reward_fn", "api_key")), model=model, run_id=run.run_id)
        if start_epoch == 1:
            self.results["epochs"] = []
            if test:
                initial: dict[str, Any] = {"epoch": 0, "seconds": {}}
                self.evaluate(run, test, initial)
                self.results["epochs"] = [initial]
                self.save()
        return self.results

    def epochs(self, start_epoch: int) -> Iterator[int]:
        """start_epoch..config.epochs, stopping before an epoch the budget cannot hold (judged by
        the one before it) and saying why in the results."""
        last_seconds = 0.0
        for epoch in range(start_epoch, self.config.epochs + 1):
            if not self.budget.allows(last_seconds):
                self.results["stopped"] = (
                    f"time budget of {self.config.time_budget_minutes} min: epoch {epoch} "
                    f"(~{last_seconds:.0f} s) would end past it"
                )
                return
            started = time.monotonic()
            yield epoch
            last_seconds = time.monotonic() - started

    def end_epoch(
        self, run: TrainingClient, entry: dict[str, Any], test: list[Problem], *, partial: bool = False
    ) -> None:
        """Evaluate when the cadence says so (never a partial epoch), checkpoint, record, report, save."""
        c = self.config
        epoch = entry["epoch"]
        entry.setdefault("seconds", {})
        if partial:
            entry["partial"] = True
        elif test and (epoch % c.eval_every == 0 or epoch == c.epochs):
            self.evaluate(run, test, entry)
        if c.checkpoint:
            name = f"{self.files.checkpoint_prefix}{epoch}"
            entry["checkpoint"] = f"{run.run_id}/{name}"
            entry["checkpoint_path"] = run.save_state(name).result().path
        self.results["epochs"].append(entry)
        self.report(entry)
        self.save()

    def finish(
        self,
        run: TrainingClient,
        test: list[Problem],
        title: str,
        rows: list[tuple[str, str, Callable[[Any], str]]],
        series: list[tuple[str, str]],
    ) -> dict[str, Any]:
        """Score the run's final adapter if its last epoch was not, then the best epoch, the
        table (the test rows first) and the plot (the test curves and `series`)."""
        last = self.results["epochs"][-1] if self.results["epochs"] else None
        if test and last is not None and last["epoch"] > 0 and "test_accuracy" not in last:
            self.evaluate(run, test, last)
            self.report(last)
        self.results["total_seconds"] = self.budget.elapsed()
        record_best(self.results)
        self.save()
        print_epoch_table(self.console, title, self.results["epochs"], [*TEST_ROWS, *rows])
        print_best(self.console, self.results, self.output_dir)
        plot_curves(self.results, self.output_dir / self.files.plot, [*TEST_SERIES, *series], title)
        return self.results

    def evaluate(self, run: TrainingClient, test: list[Problem], entry: dict[str, Any]) -> None:
        """The adapter's held-out accuracy (greedy; `test_*` keys), and lm-eval's tasks if asked."""
        t = time.monotonic()
        label = "eval test (before training)" if entry["epoch"] == 0 else f"epoch {entry['epoch']}: eval test"
        entry.update({f"test_{k}": v for k, v in self.rollouts.evaluate(run, test, label).items()})
        times = entry.setdefault("seconds", {})
        times["eval"] = time.monotonic() - t
        evaluate_with_lm_eval(self.config, run, entry, times, self.output_dir, self.console)

    def save(self) -> None:
        save_results(self.path, self.results)


def fmt(entry: dict[str, Any], key: str, spec: str) -> str:
    """`entry[key]` formatted, or '-' when it is missing or None."""
    return "-" if entry.get(key) is None else format(entry[key], spec)


def test_summary(entry: dict[str, Any]) -> str:
    """'test acc 52.0% (strict 51.5%), ' for an evaluated epoch, '' otherwise."""
    if "test_accuracy" not in entry:
        return ""
    return f"test acc {fmt(entry, 'test_accuracy', '.1%')} (strict {fmt(entry, 'test_strict_accuracy', '.1%')}), "
