"""Candidates from a run, verified: what the recipes that learn from their own samples share
(rejection SFT, DPO on buffer pairs). Sampling requests go out together and replies are graded
as they land; greedy evaluation reports the verifier's, the strict and the lenient accuracy.

The recipe's config supplies the fields used here by name: task, its data options (gsm8k_dir,
math_dir, aqua_dir, difficulty), max_samples, eval_size, seed, max_tokens, temperature,
prompts_per_sample_call.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import SamplingParams, TrainingClient
from ..tasks import Problem, Task

# reward_fn(response_text, problem) -> True when the response is correct.
RewardFn = Callable[[str, Problem], bool]


@dataclass
class Candidate:
    text: str
    correct: bool
    strict: bool  # the answer is in the required format (e.g. `Answer: 42`) and right
    mean_logprob: float


def load_problems(config: Any, task: Task) -> tuple[list[Problem], list[Problem]]:
    """The config's training and held-out test problems."""
    data_dirs = {"gsm8k": config.gsm8k_dir, "math": config.math_dir, "aqua": config.aqua_dir}
    extra = {"difficulty": config.difficulty} if config.task == "arithmetic" else {"data_dir": data_dirs[config.task]}
    train = task.load_problems("train", limit=config.max_samples, seed=config.seed, **extra)
    test = task.load_problems("test", limit=config.eval_size, seed=config.seed, **extra)
    return train, test


def best_correct(candidates: list[Candidate]) -> int | None:
    """Index of the best correct candidate: correct and well-formatted first, then the model's own score."""
    correct = [i for i, c in enumerate(candidates) if c.correct]
    if not correct:
        return None
    return max(correct, key=lambda i: (candidates[i].strict, candidates[i].mean_logprob))


def buffer_entry(epoch: int, problem: Problem, candidates: list[Candidate], **picked: int | None) -> dict[str, Any]:
    """One problem's line of a rejection buffer: its candidates, which were correct, what was picked."""
    return {
        "epoch": epoch,
        "id": problem.id,
        "question": problem.question,
        "gold": problem.gold,
        "candidates": [c.text for c in candidates],
        "correct": [c.correct for c in candidates],
        "mean_logprobs": [round(c.mean_logprob, 4) for c in candidates],
        **picked,
    }


def append_jsonl(path: Path, entries: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in entries)


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


class Rollouts:
    def __init__(self, config: Any, task: Task, reward_fn: RewardFn | None, rng: random.Random, console: Console):
        self.config, self.task, self.rng, self.console = config, task, rng, console
        self.reward_fn = reward_fn or task.is_correct

    def sample(
        self, run: TrainingClient, problems: list[Problem], n: int, greedy: bool, label: str
    ) -> list[list[Candidate]]:
        """All candidates for `problems`; requests go out together and are verified as they land."""
        c = self.config
        params = SamplingParams(
            max_tokens=c.max_tokens,
            temperature=0.0 if greedy else c.temperature,
            seed=None if greedy else self.rng.randrange(2**31),
        )
        chunks = [
            problems[i : i + c.prompts_per_sample_call] for i in range(0, len(problems), c.prompts_per_sample_call)
        ]
        futures = [
            run.sample([self.task.messages_for(p) for p in chunk], num_samples=n, sampling_params=params)
            for chunk in chunks
        ]
        results: list[list[Candidate]] = []
        correct = total = 0
        with progress_bar(self.console) as progress, ThreadPoolExecutor(8) as verifier:
            bar = progress.add_task(label, total=len(problems), acc="")
            for chunk, future in zip(chunks, futures):
                sequences = future.result().sequences
                jobs = [
                    [verifier.submit(self._candidate, seq, problem) for seq in per_prompt]
                    for problem, per_prompt in zip(chunk, sequences)
                ]
                for per_prompt in jobs:
                    candidates = [j.result() for j in per_prompt]
                    results.append(candidates)
                    correct += sum(x.correct for x in candidates)
                    total += len(candidates)
                progress.update(bar, advance=len(chunk), acc=f"acc {correct / max(total, 1):.1%}")
        return results

    def _candidate(self, sequence, problem: Problem) -> Candidate:
        text = self.task.trim_reply(sequence.text)
        n = max(len(sequence.logprobs), 1)
        return Candidate(
            text=text,
            correct=self.reward_fn(text, problem),
            strict=self.task.strict_correct(text, problem),
            mean_logprob=sum(sequence.logprobs) / n,
        )

    def evaluate(self, run: TrainingClient, problems: list[Problem], label: str) -> dict[str, float]:
        """Greedy accuracy: by the verifier, in the required format (strict), by the loosest reading (lenient)."""
        candidates = [c[0] for c in self.sample(run, problems, 1, greedy=True, label=label)]
        n = max(len(problems), 1)
        return {
            "accuracy": sum(c.correct for c in candidates) / n,
            "strict_accuracy": sum(c.strict for c in candidates) / n,
            "lenient_accuracy": sum(self.task.lenient_correct(c.text, p) for c, p in zip(candidates, problems)) / n,
        }
