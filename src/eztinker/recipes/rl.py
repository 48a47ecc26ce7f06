"""RL with group-centred advantages (GRPO-style policy gradient).

Every step takes `groups_per_step` problems; for each, a group of `num_candidates` replies is
sampled from the run's adapter and scored (`scorers.py`: Math-Verify by default, a reward model
or an LLM judge). A reply's advantage is its reward minus its group's mean (`--normalize-std`
also divides by the group's standard deviation, as GRPO does); groups whose replies all score
the same teach nothing and are skipped. Every reply token gets its reply's advantage, and the
server's `importance_sampling` loss (or `ppo`, `cispo`, `stable_reinforce`) weighs it by the
ratio of the current policy to the sampling one, using the sampling logprobs, so samples that are
a step or two old are still corrected for. The loss is averaged over the step's trained reply
tokens, which are trained in `substeps` parts, one optimizer step each: Adam moves the adapter
about the learning rate per step whatever the batch, so more, smaller steps move it further for
the same compute.

Sampling is pipelined (`SampleBuffer`): up to `max_staleness` steps' sampling requests wait on
the server ahead of the step being trained, so the server samples while this side scores and
builds the batch. `--max-staleness 0` is the plain sequential loop: sample, score, train, wait.

An epoch is one pass over the training problems. A plain script over the SDK: a typed config,
then `main(config)`; `eztinker rl --help`. Outputs under `output_dir`: `rl_rollouts.jsonl`
(every group: replies, rewards, advantages, the adapter step that sampled it), `rl_results.json`
(config, per-epoch and per-step metrics, timings, checkpoints) and `rl_accuracy.png`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from .. import AdamParams, Datum, LossFnInputs, ModelInput, SamplingParams, ServiceClient, TrainingClient
from ..tasks import TASK_NAMES, Problem, get_task
from ._cli import setting
from ._epochs import EpochLog, RecipeFiles, fmt, test_summary
from ._results import NUMBER, PERCENT, mean, open_run
from ._rollouts import Rollouts, append_jsonl, load_problems, progress_bar
from ._settings import TaskRecipeSettings
from .scorers import SCORER_NAMES, Scorer, make_scorer

T = TypeVar("T")

ROLLOUTS_FILE = "rl_rollouts.jsonl"
RESULTS_FILE = "rl_results.json"
PLOT_FILE = "rl_accuracy.png"
CHECKPOINT_PREFIX = "rl_epoch_"
FILES = RecipeFiles(results=RESULTS_FILE, plot=PLOT_FILE, checkpoint_prefix=CHECKPOINT_PREFIX)
LOSSES = ("importance_sampling", "ppo", "cispo", "stable_reinforce")
LR_SCHEDULES = ("constant", "linear")


@dataclass
class Config(TaskRecipeSettings):
    """Every field but `reward_fn` is also an `eztinker rl` flag, with this help and default
    (the shared ones are described in `_settings.py`)."""

    task: str = setting("arithmetic", "Problem set.", choices=TASK_NAMES)
    max_samples: int = setting(256, "Training problems (one epoch is one pass over them).")
    num_candidates: int = setting(4, "Group size: replies sampled per problem.")
    epochs: int = setting(1, "Passes over the training problems.")
    learning_rate: float = setting(1e-3, "Adam learning rate of the first epoch.")
    temperature: float = setting(0.8, "For the groups; evaluation is greedy.")
    max_tokens: int = setting(64, "New tokens per reply.")
    eval_size: int = setting(100, "Held-out test problems (greedy); 0 skips evaluation.")
    groups_per_step: int = setting(32, "Problems (groups) per step (sampled together, then trained on).")
    micro_batch_size: int = setting(16, "Replies per forward_backward request.")
    substeps: int = setting(
        4,
        "Optimizer steps per step: its trained replies are split in this many parts, each one "
        "forward_backward and one optim_step (the later parts are corrected by the importance ratio).",
    )
    loss_fn: str = setting("importance_sampling", "Policy-gradient loss on the server.", choices=LOSSES)
    normalize_std: bool = setting(False, "Divide advantages by the group's reward standard deviation (GRPO).")
    lr_schedule: str = setting(
        "linear",
        "'linear': the learning rate falls linearly to 0 over the run (its steps, or its time budget, "
        "whichever ends first); 'constant': it stays (times --lr-decay per epoch in both).",
        choices=LR_SCHEDULES,
    )
    max_staleness: int = setting(
        1,
        "Steps the sampling adapter may lag the trained one: sampling for that many steps ahead is "
        "queued while a step trains (0: the sequential loop).",
    )
    scorer: str = setting(
        "verifier", "Rewards: the task's verifier (Math-Verify), a reward model, or an LLM judge.", choices=SCORER_NAMES
    )
    reward_model: str | None = setting(
        None, "--scorer reward-model: a sequence-classification model (folder or Hub id)."
    )
    judge_model: str | None = setting(None, "--scorer judge: a base model on the server (default: its first).")
    time_budget_minutes: float | None = setting(
        None,
        "Start no step that would end past this many minutes from the start, judged by the previous "
        "step's duration (the final evaluation still runs).",
    )
    stop_after_empty_steps: int = setting(
        10,
        "Stop after this many steps in a row in which no group had mixed rewards (every reply right, "
        "or every one wrong: nothing to learn from, e.g. after a collapse); 0: never.",
    )
    checkpoint: bool = setting(False, "Save rl_epoch_<k> every epoch.")
    resume_from: str | None = setting(
        None,
        "Continue after '<run_id>/rl_epoch_<k>' (an epoch cut short by the time budget is saved too, "
        "and resuming from it goes on with epoch k+1).",
    )


# ------------------------------------------------------------------------- advantages
def group_advantages(rewards: Sequence[float], normalize_std: bool = True) -> list[float]:
    """Reward minus the group mean, over the group's (population) standard deviation when asked;
    all zeros when every reply scored the same."""
    mu = sum(rewards) / len(rewards)
    centred = [r - mu for r in rewards]
    std = math.sqrt(sum(c * c for c in centred) / len(rewards))
    if std < 1e-6:
        return [0.0] * len(rewards)
    return [c / std for c in centred] if normalize_std else centred


@dataclass
class Reply:
    text: str  # as scored (after the task's trim)
    tokens: list[int]  # as sampled, end-of-turn token included
    logprobs: list[float]
    reward: float
    correct: bool


@dataclass
class Group:
    problem: Problem
    prompt_tokens: list[int]
    replies: list[Reply]
    sampled_at: int  # optimizer steps of the adapter that sampled it
    advantages: list[float] = field(default_factory=list)


def policy_datum(prompt_tokens: Sequence[int], reply: Reply, advantage: float) -> Datum:
    """Next-token example over prompt + reply: each reply token carries the advantage (already
    scaled) and its sampling logprob; prompt positions carry nothing."""
    tokens = [*prompt_tokens, *reply.tokens]
    pad = [0.0] * (len(prompt_tokens) - 1)
    return Datum(
        model_input=ModelInput(tokens=tokens[:-1]),
        loss_fn_inputs=LossFnInputs(
            target_tokens=tokens[1:],
            logprobs=pad + list(reply.logprobs),
            advantages=pad + [advantage] * len(reply.tokens),
        ),
    )


def step_data(groups: Sequence[Group]) -> tuple[list[Datum], int]:
    """The step's examples (replies with a nonzero advantage) and their reply-token count; the
    advantages are divided by it, so the summed loss is a per-token mean."""
    trained = [(g, r, a) for g in groups for r, a in zip(g.replies, g.advantages) if a != 0.0]
    tokens = sum(len(r.tokens) for _, r, _ in trained)
    return [policy_datum(g.prompt_tokens, r, a / tokens) for g, r, a in trained], tokens


# ---------------------------------------------------------------------- the sampler side
class SampleBuffer:
    """Groups for the coming steps. `request(i)` submits step i's sampling to the server at once
    and scores the replies in a background thread as soon as they land; `take(i)` waits for them."""

    def __init__(
        self, run: TrainingClient, task, scorer: Scorer, params: SamplingParams, group_size: int, rng: random.Random
    ):
        self.run, self.task, self.scorer, self.params, self.group_size, self.rng = (
            run,
            task,
            scorer,
            params,
            group_size,
            rng,
        )
        self.pending: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="rl-score")

    def request(self, index: int, problems: list[Problem], sampled_at: int) -> None:
        if index in self.pending:
            return
        params = self.params.model_copy(update={"seed": self.rng.randrange(2**31)})
        future = self.run.sample([self.task.messages_for(p) for p in problems], self.group_size, params)
        self.pending[index] = self.pool.submit(self._score, future, problems, sampled_at)

    def take(self, index: int) -> list[Group]:
        return self.pending.pop(index).result()

    def _score(self, future, problems: list[Problem], sampled_at: int) -> list[Group]:
        result = future.result()
        groups = []
        for problem, prompt_tokens, sequences in zip(problems, result.prompt_tokens, result.sequences):
            texts = [self.task.trim_reply(s.text) for s in sequences]
            rewards = self.scorer(problem, texts)
            replies = [
                Reply(text, list(s.tokens), list(s.logprobs), float(reward), self.task.is_correct(text, problem))
                for text, s, reward in zip(texts, sequences, rewards)
            ]
            groups.append(Group(problem, list(prompt_tokens), replies, sampled_at))
        return groups

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------ metrics
def step_metrics(
    groups: list[Group],
    data: list[Datum],
    fb_logprobs: list[list[float | None]],
    trained_on: int,
    grad_norm: float | None = None,
) -> dict[str, Any]:
    """A step's numbers, the ones that tell an unstable run apart: reward (mean, and its spread
    inside groups), accuracy, mixed groups, KL(sampler || trainer) and the sampler's entropy (both
    per token, estimated from the sampled tokens), the importance ratios trainer/sampler on the
    trained tokens (mean, max, and the fraction outside PPO's [0.8, 1.2] clip range), the gradient
    norm before clipping, lengths, and staleness (how many updates the adapter that sampled a group
    lags the one it is trained on, `trained_on`)."""
    replies = [r for g in groups for r in g.replies]
    log_ratios = []  # log(trainer / sampler) per trained token
    for datum, row in zip(data, fb_logprobs):
        sampler_logprobs, advantages = datum.loss_fn_inputs.logprobs, datum.loss_fn_inputs.advantages
        assert sampler_logprobs is not None and advantages is not None, "policy_datum sets both"
        for sampled, trained, adv in zip(sampler_logprobs, row, advantages):
            if adv != 0.0 and trained is not None:
                log_ratios.append(trained - sampled)
    ratios = [math.exp(min(lr, 50.0)) for lr in log_ratios]
    return {
        "step": trained_on + bool(data),  # the adapter's step after this one (none taken without data)
        "mean_reward": mean(r.reward for r in replies),
        "reward_std_in_group": mean(_std([r.reward for r in g.replies]) for g in groups),
        "train_accuracy": mean(r.correct for r in replies),
        "mixed_groups": mean(any(a != 0.0 for a in g.advantages) for g in groups),
        "kl_sample_train": -mean(log_ratios) if log_ratios else None,
        "ratio_mean": mean(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "ratio_clipped": mean(not 0.8 <= x <= 1.2 for x in ratios) if ratios else None,
        "grad_norm": grad_norm,
        "entropy": -sum(sum(r.logprobs) for r in replies) / max(sum(len(r.logprobs) for r in replies), 1),
        "reply_tokens": mean(len(r.tokens) for r in replies),
        "trained_replies": len(data),
        "staleness": mean(trained_on - g.sampled_at for g in groups),
    }


def _std(values: Sequence[float]) -> float:
    mu = sum(values) / len(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))


EPOCH_MEANS = (
    "mean_reward",
    "reward_std_in_group",
    "ratio_mean",
    "ratio_clipped",
    "grad_norm",
    "train_accuracy",
    "mixed_groups",
    "kl_sample_train",
    "entropy",
    "reply_tokens",
    "staleness",
)


def split_evenly(items: list[T], parts: int) -> list[list[T]]:
    """`items` in up to `parts` consecutive parts whose sizes differ by at most one (no empty part)."""
    parts = min(parts, len(items))
    cuts = [round(k * len(items) / parts) for k in range(parts + 1)] if parts else [0]
    return [items[a:b] for a, b in zip(cuts, cuts[1:])]


def epoch_summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    # A step whose groups all scored alike trains on nothing and takes no optimizer step.
    summary: dict[str, Any] = {
        "optimizer_steps": sum(s.get("optimizer_steps", 1 if s["trained_replies"] else 0) for s in steps),
        "trained_replies": sum(s["trained_replies"] for s in steps),
    }
    for key in EPOCH_MEANS:
        values = [s[key] for s in steps if s.get(key) is not None]
        summary[key] = mean(values) if values else None
    return summary


# ------------------------------------------------------------------------------- recipe
class RL:
    def __init__(self, config: Config, console: Console | None = None):
        if config.groups_per_step < 1 or config.num_candidates < 2:
            raise ValueError("--groups-per-step must be at least 1 and --num-candidates at least 2 (a group)")
        if config.max_staleness < 0:
            raise ValueError("--max-staleness must be 0 or more")
        if config.stop_after_empty_steps < 0:
            raise ValueError("--stop-after-empty-steps must be 0 (never stop) or more")
        if config.substeps < 1:
            raise ValueError("--substeps must be at least 1")
        self.config = config
        self.console = console or Console()
        self.task = get_task(config.task)
        self.output_dir = Path(config.output_dir)
        self.rng = random.Random(config.seed)
        self.rollouts = Rollouts(config, self.task, config.reward_fn, self.rng, self.console)
        self.log = EpochLog(config, FILES, self.console, self.rollouts, report=self._report)
        self.budget = self.log.budget

    def schedule(self, train: list[Problem], start_epoch: int) -> list[tuple[int, list[Problem]]]:
        """(epoch, problems) of every step from `start_epoch` on; each epoch in its own seeded order."""
        c, steps = self.config, []
        for epoch in range(start_epoch, c.epochs + 1):
            order = list(train)
            random.Random(c.seed * 1_000_003 + epoch).shuffle(order)
            steps += [(epoch, order[i : i + c.groups_per_step]) for i in range(0, len(order), c.groups_per_step)]
        return steps

    def learning_rate(self, epoch: int, steps_done: float) -> float:
        """The step's learning rate; `steps_done` is the fraction of the scheduled steps already taken."""
        c = self.config
        lr = c.learning_rate * c.lr_decay ** (epoch - 1)
        if c.lr_schedule == "linear":
            lr *= 1.0 - max(steps_done, self.budget.fraction_used())
        return lr

    def run(self) -> dict[str, Any]:
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        service = ServiceClient(c.server_url, api_key=c.api_key)
        health = service.health()
        scorer = make_scorer(c, self.task, service)
        train, test = load_problems(c, self.task)
        test = test if c.eval_size > 0 else []
        run, start_epoch = open_run(service, c, CHECKPOINT_PREFIX, self.output_dir / ROLLOUTS_FILE)
        self.console.print(
            f"[bold]RL[/] ({c.loss_fn}, scorer {c.scorer}) on {c.task}: model {health.model}, run {run.run_id}, "
            f"{len(train)} train / {len(test)} test problems, groups of {c.num_candidates}, "
            f"{c.groups_per_step} per step, max staleness {c.max_staleness}, epochs {start_epoch}..{c.epochs}"
        )
        results = self.log.start(run, health.model, start_epoch, test)
        results["steps"] = [s for s in results.get("steps", []) if s["epoch"] < start_epoch]
        params = SamplingParams(max_tokens=c.max_tokens, temperature=c.temperature)
        buffer = SampleBuffer(run, self.task, scorer, params, c.num_candidates, self.rng)
        try:
            self._train(run, buffer, self.schedule(train, start_epoch), test, results)
        finally:
            buffer.close()
        return self.log.finish(
            run,
            test,
            f"RL ({c.loss_fn}) on {c.task} ({health.model}), scorer {c.scorer}",
            [
                ("train accuracy (groups)", "train_accuracy", PERCENT),
                ("mean reward", "mean_reward", NUMBER),
                ("reward spread in groups", "reward_std_in_group", NUMBER),
                ("groups with mixed rewards", "mixed_groups", PERCENT),
                ("KL(sampler || trainer)", "kl_sample_train", NUMBER),
                ("ratios outside [0.8, 1.2]", "ratio_clipped", PERCENT),
                ("gradient norm", "grad_norm", NUMBER),
                ("entropy per token", "entropy", NUMBER),
                ("reply tokens", "reply_tokens", NUMBER),
                ("staleness (steps)", "staleness", NUMBER),
                ("optimizer steps", "optimizer_steps", str),
            ],
            [("train_accuracy", "train accuracy (groups)")],
        )

    def _train(
        self,
        run: TrainingClient,
        buffer: SampleBuffer,
        schedule: list[tuple[int, list[Problem]]],
        test: list[Problem],
        results: dict[str, Any],
    ) -> None:
        c = self.config
        step_at = run.info().step
        ahead = c.max_staleness
        for i in range(min(ahead + 1, len(schedule))):  # the first steps' sampling, all on the current adapter
            buffer.request(i, schedule[i][1], step_at)
        epoch_steps: list[dict[str, Any]] = []
        epoch_times = {"wait_for_samples": 0.0, "train": 0.0}
        last_step_seconds = 0.0
        empty_steps = 0  # in a row, ending with the last one
        with progress_bar(self.console) as progress:
            bar = progress.add_task("rl", total=len(schedule), acc="")
            for i, (epoch, _problems) in enumerate(schedule):
                if not self.budget.allows(last_step_seconds):
                    results["stopped"] = (
                        f"time budget of {c.time_budget_minutes} min: a step (~{last_step_seconds:.0f} s) "
                        f"would end past it, after {step_at} optimizer steps"
                    )
                    break
                step_started = time.monotonic()
                groups = buffer.take(i)
                epoch_times["wait_for_samples"] += time.monotonic() - step_started
                t = time.monotonic()
                for g in groups:
                    g.advantages = group_advantages([r.reward for r in g.replies], c.normalize_std)
                data, _ = step_data(groups)
                lr = self.learning_rate(epoch, i / len(schedule))
                trained_on = step_at
                fbs, optims = [], []
                for part in split_evenly(data, c.substeps):
                    fbs += [
                        run.forward_backward(part[k : k + c.micro_batch_size], loss_fn=c.loss_fn)
                        for k in range(0, len(part), c.micro_batch_size)
                    ]
                    optims.append(run.optim_step(AdamParams(learning_rate=lr)))
                if ahead and i + ahead + 1 < len(schedule):  # queued behind this step's updates
                    buffer.request(i + ahead + 1, schedule[i + ahead + 1][1], trained_on + len(optims))
                fb_logprobs = [row for f in fbs for row in f.result().logprobs]
                loss = sum(f.result().loss for f in fbs) if fbs else None
                grad_norm = None
                if optims:
                    step_at = optims[-1].result().step
                    grad_norm = mean(o.result().grad_norm for o in optims)
                if not ahead and i + 1 < len(schedule):  # sequential: sample only once the update is in
                    buffer.request(i + 1, schedule[i + 1][1], step_at)
                epoch_times["train"] += time.monotonic() - t
                metrics = {
                    "epoch": epoch,
                    **step_metrics(groups, data, fb_logprobs, trained_on, grad_norm),
                    "step": step_at,
                    "optimizer_steps": len(optims),
                    "loss": loss,
                    "learning_rate": lr,
                    "seconds": round(time.monotonic() - step_started, 3),
                }
                epoch_steps.append(metrics)
                results["steps"].append(metrics)
                self._log_groups(epoch, step_at, groups)
                progress.update(bar, advance=1, acc=f"reward {metrics['mean_reward']:.2f}")
                last_step_seconds = time.monotonic() - step_started
                if i + 1 == len(schedule) or schedule[i + 1][0] != epoch:
                    self._end_epoch(run, epoch, epoch_steps, epoch_times, test, partial=False)
                    epoch_steps, epoch_times = [], {"wait_for_samples": 0.0, "train": 0.0}
                empty_steps = 0 if optims else empty_steps + 1
                if c.stop_after_empty_steps and empty_steps >= c.stop_after_empty_steps:
                    results["stopped"] = (
                        f"{empty_steps} steps in a row had no group with mixed rewards (mean reward "
                        f"{metrics['mean_reward']:.2f}): nothing to learn from, after {step_at} optimizer steps"
                    )
                    break
        if epoch_steps:  # stopped by the budget or by empty steps inside an epoch
            self._end_epoch(run, epoch_steps[-1]["epoch"], epoch_steps, epoch_times, test, partial=True)

    def _end_epoch(
        self,
        run: TrainingClient,
        epoch: int,
        steps: list[dict[str, Any]],
        times: dict[str, float],
        test: list[Problem],
        partial: bool,
    ) -> None:
        entry: dict[str, Any] = {
            "epoch": epoch,
            **epoch_summary(steps),
            "learning_rate": steps[-1]["learning_rate"],
            "seconds": dict(times),
        }
        self.log.end_epoch(run, entry, test, partial=partial)

    def _log_groups(self, epoch: int, step: int, groups: list[Group]) -> None:
        append_jsonl(
            self.output_dir / ROLLOUTS_FILE,
            [
                {
                    "epoch": epoch,
                    "step": step,
                    "sampled_at": g.sampled_at,
                    "id": g.problem.id,
                    "gold": g.problem.gold,
                    "replies": [r.text for r in g.replies],
                    "rewards": [r.reward for r in g.replies],
                    "correct": [r.correct for r in g.replies],
                    "advantages": [round(a, 4) for a in g.advantages],
                }
                for g in groups
            ],
        )

    def _report(self, entry: dict[str, Any]) -> None:
        self.console.print(
            f"epoch {entry['epoch']}{' (partial)' if entry.get('partial') else ''}: "
            f"{test_summary(entry)}{entry.get('optimizer_steps', 0)} steps, "
            f"reward {fmt(entry, 'mean_reward', '.3f')}, mixed groups {fmt(entry, 'mixed_groups', '.0%')}, "
            f"KL {fmt(entry, 'kl_sample_train', '.4f')}, entropy {fmt(entry, 'entropy', '.3f')}"
        )


def main(config: Config) -> dict[str, Any]:
    return RL(config).run()
