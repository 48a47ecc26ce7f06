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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from .. import AdamParams, ServiceClient, TrainingClient, datum_from_messages
from ..chat import loss_weights
from ..tasks import Problem, get_task
from ..tasks._grading import trim_after_answer as trim_after_answer  # part of this recipe's interface
from ._cli import setting
from ._epochs import EpochLog, RecipeFiles, fmt, test_summary
from ._results import NUMBER, PERCENT, mean, open_run
from ._rollouts import Candidate, Rollouts, append_jsonl, best_correct, buffer_entry, load_problems, progress_bar
from ._settings import TaskRecipeSettings

BUFFER_FILE = "rejection_buffer.jsonl"
RESULTS_FILE = "rejection_sft_results.json"
PLOT_FILE = "rejection_sft_accuracy.png"
CHECKPOINT_PREFIX = "rejection_sft_epoch_"
FILES = RecipeFiles(results=RESULTS_FILE, plot=PLOT_FILE, checkpoint_prefix=CHECKPOINT_PREFIX)


@dataclass
class Config(TaskRecipeSettings):
    """Every field but `reward_fn` is also an `eztinker rsft` flag, with this help and default
    (the shared ones are described in `_settings.py`)."""

    batch_size: int = setting(8, "Examples per optimizer step (gradient accumulated over the batch).")
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

    def record_buffer(
        self, epoch: int, problems: list[Problem], candidates: list[list[Candidate]]
    ) -> list[tuple[Problem, str]]:
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
        data = [
            datum_from_messages(tokenizer, [*self.task.messages_for(p), {"role": "assistant", "content": text}])
            for p, text in chosen
        ]
        futures = []
        for start in range(0, len(data), c.batch_size):
            batch = data[start : start + c.batch_size]
            tokens = sum(sum(1 for w in loss_weights(d) if w) for d in batch)
            for d in batch:  # mean per-token loss over the batch
                d.loss_fn_inputs.weights = [w / tokens for w in loss_weights(d)]
            fbs = [
                run.forward_backward(batch[i : i + c.micro_batch_size])
                for i in range(0, len(batch), c.micro_batch_size)
            ]
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
        test = test if c.eval_size > 0 else []
        run, start_epoch = open_run(service, c, FILES.checkpoint_prefix, self.output_dir / BUFFER_FILE)
        tokenizer = run.get_tokenizer()
        self.console.print(
            f"[bold]rejection SFT[/] on {c.task}: model {health.model}, run {run.run_id}, "
            f"{len(train)} train / {len(test)} test problems, {c.num_candidates} candidates, epochs "
            f"{start_epoch}..{c.epochs}"
        )
        log = EpochLog(c, FILES, self.console, self.rollouts, report=self._report)
        log.start(run, health.model, start_epoch, test)
        for epoch in log.epochs(start_epoch):
            times: dict[str, float] = {}
            t = time.monotonic()
            # Epoch 1 trains on the buffer filled by the initial model (phase 2); later epochs
            # regenerate candidates with the updated adapter.
            candidates = self.rollouts.sample(
                run, train, c.num_candidates, greedy=False, label=f"epoch {epoch}: sample"
            )
            times["sample"] = time.monotonic() - t
            chosen = self.record_buffer(epoch, train, candidates)
            t = time.monotonic()
            lr = c.learning_rate * c.lr_decay ** (epoch - 1)
            loss = self.train(run, chosen, lr, tokenizer) if chosen else None  # no correct candidate: nothing trained
            times["train"] = time.monotonic() - t
            entry: dict[str, Any] = {
                "epoch": epoch,
                "learning_rate": lr,
                "train_accuracy": mean(x.correct for cands in candidates for x in cands),
                "rejection_quality": mean(sum(x.correct for x in cands) for cands in candidates),
                "coverage": mean(any(x.correct for x in cands) for cands in candidates),
                "trained_examples": len(chosen),
                "optimizer_steps": -(-len(chosen) // c.batch_size),
                "train_loss": loss,
                "seconds": times,
            }
            log.end_epoch(run, entry, test)
        return log.finish(
            run,
            test,
            f"Rejection-sampling SFT on {c.task} ({health.model})",
            [
                ("train accuracy (candidates)", "train_accuracy", PERCENT),
                (f"rejection quality (of {c.num_candidates})", "rejection_quality", NUMBER),
                ("train loss", "train_loss", NUMBER),
            ],
            [("train_accuracy", "train candidates")],
        )

    def _report(self, entry: dict[str, Any]) -> None:
        self.console.print(
            f"epoch {entry['epoch']}: {test_summary(entry)}train acc {fmt(entry, 'train_accuracy', '.1%')}, "
            f"{entry.get('trained_examples', 0)} trained, loss {fmt(entry, 'train_loss', '.3f')}"
        )


def main(config: Config) -> dict[str, Any]:
    return RejectionSFT(config).run()
