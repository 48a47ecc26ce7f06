"""Rejection-sampling SFT: sample N candidates per problem, verify them, train on the best
correct one, repeat for several epochs; report train/test accuracy per epoch.

A plain script over the SDK (it talks to the server only through `eztinker.ServiceClient`):
a typed config with defaults, then `main(config)`. Run it as `eztinker rsft --help`.

Outputs under `output_dir`: `rejection_buffer.jsonl` (every problem of every epoch: candidates,
which were correct, which was chosen), `rejection_sft_results.json` (config, per-epoch metrics,
timings, checkpoints) and `rejection_sft_accuracy.png`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .. import AdamParams, ServiceClient, TrainingClient, datum_from_messages
from ..tasks import Problem, get_task
from ..tasks._grading import trim_after_answer as trim_after_answer  # part of this recipe's interface
from ._cli import setting
from ._settings import TaskRecipeSettings
from ._results import config_dict, epoch_of, mean, plot_curves, previous_results, save_results
from ._rollouts import Candidate, Rollouts, append_jsonl, best_correct, buffer_entry, load_problems, progress_bar

BUFFER_FILE = "rejection_buffer.jsonl"
RESULTS_FILE = "rejection_sft_results.json"
PLOT_FILE = "rejection_sft_accuracy.png"
CHECKPOINT_PREFIX = "rejection_sft_epoch_"


@dataclass
class Config(TaskRecipeSettings):
    """Every field but `reward_fn` is also an `eztinker rsft` flag, with this help and default
    (the shared ones are described in `_settings.py`)."""

    checkpoint: bool = setting(False, "Save rejection_sft_epoch_<k> every epoch.")
    resume_from: str | None = setting(None, "Continue after '<run_id>/rejection_sft_epoch_<k>'.")


# ------------------------------------------------------------------------------------ recipe
class RejectionSFT:
    def __init__(self, config: Config, console: Console | None = None):
        self.config = config
        self.console = console or Console()
        self.task = get_task(config.task)
        self.output_dir = Path(config.output_dir)
        self.rng = random.Random(config.seed)
        self.rollouts = Rollouts(config, self.task, config.reward_fn, self.rng, self.console)

    # ------------------------------------------------------------------------ data
    def load_problems(self) -> tuple[list[Problem], list[Problem]]:
        return load_problems(self.config, self.task)

    # -------------------------------------------------------------------- selection
    select = staticmethod(best_correct)

    def record_buffer(self, epoch: int, problems: list[Problem], candidates: list[list[Candidate]]) -> list[tuple[Problem, str]]:
        chosen: list[tuple[Problem, str]] = []
        entries = []
        for problem, cands in zip(problems, candidates):
            best = self.select(cands)
            if best is not None:
                chosen.append((problem, cands[best].text))
            entries.append(buffer_entry(epoch, problem, cands, chosen=best))
        append_jsonl(self.output_dir / BUFFER_FILE, entries)
        return chosen

    # --------------------------------------------------------------------- training
    def train(self, run: TrainingClient, chosen: list[tuple[Problem, str]], learning_rate: float, tokenizer) -> float:
        """One pass over the selected responses; returns the mean per-token loss."""
        c = self.config
        self.rng.shuffle(chosen)
        data = [datum_from_messages(tokenizer, [*self.task.messages_for(p), {"role": "assistant", "content": text}]) for p, text in chosen]
        futures = []
        for start in range(0, len(data), c.batch_size):
            batch = data[start : start + c.batch_size]
            tokens = sum(sum(1 for w in d.loss_fn_inputs.weights if w) for d in batch)
            for d in batch:  # mean per-token loss over the batch
                d.loss_fn_inputs.weights = [w / tokens for w in d.loss_fn_inputs.weights]
            fbs = [run.forward_backward(batch[i : i + c.micro_batch_size]) for i in range(0, len(batch), c.micro_batch_size)]
            futures.append((fbs, run.optim_step(AdamParams(learning_rate=learning_rate))))
        losses = []
        with progress_bar(self.console) as progress:
            bar = progress.add_task("train", total=len(futures), acc="")
            for fbs, step in futures:
                losses.append(sum(f.result().loss for f in fbs))
                step.result()
                progress.update(bar, advance=1, acc=f"loss {losses[-1]:.3f}")
        return sum(losses) / max(len(losses), 1)

    # ------------------------------------------------------------------------- main
    def run(self) -> dict[str, Any]:
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        service = ServiceClient(c.server_url, api_key=c.api_key)
        health = service.health()
        train, test = self.load_problems()
        start_epoch = 1
        if c.resume_from:
            start_epoch = epoch_of(c.resume_from, CHECKPOINT_PREFIX) + 1
            run = service.create_training_run(from_checkpoint=c.resume_from, seed=c.seed)
        else:
            run = service.create_training_run(lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, seed=c.seed)
            (self.output_dir / BUFFER_FILE).unlink(missing_ok=True)
        tokenizer = run.get_tokenizer()
        self.console.print(
            f"[bold]rejection SFT[/] on {c.task}: model {health.model}, run {run.run_id}, "
            f"{len(train)} train / {len(test)} test problems, {c.num_candidates} candidates, epochs {start_epoch}..{c.epochs}"
        )
        results = previous_results(self.output_dir / RESULTS_FILE, c.resume_from, CHECKPOINT_PREFIX) if c.resume_from else {"epochs": []}
        results.update(config=config_dict(c, drop=("reward_fn", "api_key")), model=health.model, run_id=run.run_id)
        started = time.monotonic()

        if start_epoch == 1:
            t = time.monotonic()
            test_metrics = self.rollouts.evaluate(run, test, "eval test (before training)")
            results["epochs"] = [{"epoch": 0, **{f"test_{k}": v for k, v in test_metrics.items()}, "seconds": {"eval": time.monotonic() - t}}]
            save_results(self.output_dir / RESULTS_FILE, results)
        candidates = None
        for epoch in range(start_epoch, c.epochs + 1):
            times: dict[str, float] = {}
            t = time.monotonic()
            # Epoch 1 trains on the buffer filled by the initial model (phase 2); later epochs
            # regenerate candidates with the updated adapter.
            candidates = self.rollouts.sample(run, train, c.num_candidates, greedy=False, label=f"epoch {epoch}: sample")
            times["sample"] = time.monotonic() - t
            chosen = self.record_buffer(epoch, train, candidates)
            t = time.monotonic()
            lr = c.learning_rate * c.lr_decay ** (epoch - 1)
            loss = self.train(run, chosen, lr, tokenizer) if chosen else None  # no correct candidate: nothing trained
            times["train"] = time.monotonic() - t
            t = time.monotonic()
            test_metrics = self.rollouts.evaluate(run, test, f"epoch {epoch}: eval test")
            times["eval"] = time.monotonic() - t
            entry = {
                "epoch": epoch,
                "learning_rate": lr,
                "train_accuracy": mean(x.correct for cands in candidates for x in cands),
                "rejection_quality": mean(sum(x.correct for x in cands) for cands in candidates),
                "coverage": mean(any(x.correct for x in cands) for cands in candidates),
                "trained_examples": len(chosen),
                "train_loss": loss,
                **{f"test_{k}": v for k, v in test_metrics.items()},
                "seconds": times,
            }
            if c.checkpoint:
                entry["checkpoint"] = f"{run.run_id}/{CHECKPOINT_PREFIX}{epoch}"
                entry["checkpoint_path"] = run.save_state(f"{CHECKPOINT_PREFIX}{epoch}").result().path
            results["epochs"].append(entry)
            self.console.print(
                f"epoch {epoch}: test acc {entry['test_accuracy']:.1%} (strict {entry['test_strict_accuracy']:.1%}), "
                f"train acc {entry['train_accuracy']:.1%}, {len(chosen)} trained, loss {'-' if loss is None else f'{loss:.3f}'}"
            )
            save_results(self.output_dir / RESULTS_FILE, results)
        results["total_seconds"] = time.monotonic() - started
        best = max(results["epochs"], key=lambda e: e["test_accuracy"])
        results["best_epoch"] = best["epoch"]
        results["best_checkpoint"] = best.get("checkpoint")  # None: the untrained model was best
        save_results(self.output_dir / RESULTS_FILE, results)
        self.print_table(results)
        plot_accuracy(results, self.output_dir / PLOT_FILE)
        return results

    def print_table(self, results: dict[str, Any]) -> None:
        epochs = results["epochs"]
        table = Table(title=f"Rejection-sampling SFT on {self.config.task} ({results['model']})")
        table.add_column("metric")
        for e in epochs:
            table.add_column("initial" if e["epoch"] == 0 else f"epoch {e['epoch']}", justify="right")
        n = self.config.num_candidates

        def row(label: str, key: str, fmt: Callable[[float], str]) -> None:
            table.add_row(label, *[fmt(e[key]) if e.get(key) is not None else "-" for e in epochs])

        row("train accuracy (candidates)", "train_accuracy", lambda v: f"{v:.1%}")
        row("test accuracy", "test_accuracy", lambda v: f"{v:.1%}")
        row("test strict (format) acc.", "test_strict_accuracy", lambda v: f"{v:.1%}")
        row("test lenient (last number)", "test_lenient_accuracy", lambda v: f"{v:.1%}")
        row(f"rejection quality (of {n})", "rejection_quality", lambda v: f"{v:.2f}")
        row("train loss", "train_loss", lambda v: f"{v:.3f}")
        self.console.print(table)
        best, checkpoint = results.get("best_epoch"), results.get("best_checkpoint")
        where = "the start (no training helped)" if best == 0 else f"epoch {best}"
        kept = f", checkpoint {checkpoint} (load it with `from_checkpoint`)" if checkpoint else ""
        self.console.print(f"best test accuracy at {where}{kept}; outputs in {self.output_dir}/")

def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    series = [("test_accuracy", "test (verifier)"), ("test_strict_accuracy", "test strict format"),
              ("test_lenient_accuracy", "test lenient"), ("train_accuracy", "train candidates")]
    plot_curves(results, path, series, f"Rejection-sampling SFT: {results['config']['task']} on {results['model']}")


def main(config: Config) -> dict[str, Any]:
    return RejectionSFT(config).run()
