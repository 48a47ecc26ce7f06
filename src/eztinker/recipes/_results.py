"""A recipe's results file and what resuming needs from it: the results JSON written atomically
after every epoch, the run to train (new or restored), the epoch a checkpoint name stands for,
the earlier epochs a resumed run keeps, the config as JSON, the epoch table and the accuracy plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any


def save_results(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def epoch_of(checkpoint_ref: str, prefix: str) -> int:
    """'<run_id>/<prefix><k>' -> k; ValueError for any other name."""
    name = checkpoint_ref.rsplit("/", 1)[-1]
    if not name.startswith(prefix) or not name[len(prefix) :].isdigit():
        raise ValueError(f"resume_from must name a '{prefix}<k>' checkpoint, got {checkpoint_ref!r}")
    return int(name[len(prefix) :])


def open_run(service, config: Any, prefix: str, log_file: Path):
    """(run, first epoch to train): a new run, whose log file starts empty, or, with
    `config.resume_from`, a run restored from that '<prefix><k>' checkpoint, going on at k + 1."""
    if config.resume_from:
        start_epoch = epoch_of(config.resume_from, prefix) + 1
        return service.create_training_run(from_checkpoint=config.resume_from, seed=config.seed), start_epoch
    log_file.unlink(missing_ok=True)
    return service.create_training_run(lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, seed=config.seed), 1


def previous_results(path: Path, resume_from: str, prefix: str) -> dict[str, Any]:
    """The results of the run being resumed, up to and including the checkpoint's epoch."""
    if not path.exists():
        return {"epochs": []}
    previous = json.loads(path.read_text())
    keep = epoch_of(resume_from, prefix)
    previous["epochs"] = [e for e in previous.get("epochs", []) if e["epoch"] <= keep]
    previous["resumed_from"] = resume_from
    return previous


def config_dict(config: Any, *, drop: tuple[str, ...]) -> dict[str, Any]:
    """The config as JSON values, without `drop` (secrets, functions)."""
    data = asdict(config)
    for name in drop:
        data.pop(name)
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def plot_curves(results: dict[str, Any], path: Path, series: list[tuple[str, str]], title: str) -> None:
    """One accuracy line per (results key, label) over the epochs; epoch 0 is before training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = results["epochs"]
    xs = [e["epoch"] for e in epochs]
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for key, label in series:
        points = [(x, e[key]) for x, e in zip(xs, epochs) if e.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
            plotted = True
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Rows every recipe's epoch table shows (label, results key, format).
PERCENT, NUMBER = (lambda v: f"{v:.1%}"), (lambda v: f"{v:.3f}")
TEST_ROWS = [
    ("test accuracy", "test_accuracy", PERCENT),
    ("test strict (format) acc.", "test_strict_accuracy", PERCENT),
    ("test lenient (last number)", "test_lenient_accuracy", PERCENT),
]
TEST_SERIES = [
    ("test_accuracy", "test (verifier)"),
    ("test_strict_accuracy", "test strict format"),
    ("test_lenient_accuracy", "test lenient"),
]


def print_epoch_table(console, title: str, epochs: list[dict[str, Any]], rows) -> None:
    """One column per epoch ('initial' for epoch 0), one row per (label, key, format); '-' where unset."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for e in epochs:
        table.add_column("initial" if e["epoch"] == 0 else f"epoch {e['epoch']}", justify="right")
    for label, key, fmt in rows:
        table.add_row(label, *[fmt(e[key]) if e.get(key) is not None else "-" for e in epochs])
    console.print(table)


def record_best(results: dict[str, Any]) -> None:
    """The best-scoring epoch and its checkpoint (None: the untrained model was best)."""
    scored = [e for e in results["epochs"] if e.get("test_accuracy") is not None]
    if scored:
        best = max(scored, key=lambda e: e["test_accuracy"])
        results["best_epoch"] = best["epoch"]
        results["best_checkpoint"] = best.get("checkpoint")


def print_best(console, results: dict[str, Any], output_dir: Path) -> None:
    if "stopped" in results:
        console.print(f"stopped: {results['stopped']}")
    best = results.get("best_epoch")
    if best is None:
        console.print(f"outputs in {output_dir}/")
        return
    where = "the start (no training helped)" if best == 0 else f"epoch {best}"
    checkpoint = results.get("best_checkpoint")
    kept = f", checkpoint {checkpoint} (load it with `from_checkpoint`)" if checkpoint else ""
    console.print(f"best test accuracy at {where}{kept}; outputs in {output_dir}/")
