"""DPO (direct preference optimisation): train a run to prefer each pair's chosen reply over its
rejected one, relative to a frozen reference model.

Per pair, with summed reply logprobs under the policy (pi) and the reference (ref):

    chosen_reward   = beta * (pi(chosen)   - ref(chosen))
    rejected_reward = beta * (pi(rejected) - ref(rejected))
    loss            = -log sigmoid(chosen_reward - rejected_reward)

Pairs come from a JSONL file of {prompt, chosen, rejected}, or are built every epoch from the
run's own samples (the rejection buffer): per problem, the best correct candidate against the
incorrect one the model finds likeliest. The reference is the base model (a second run whose
LoRA update is still zero) or a frozen checkpoint; its logprobs are computed once per pair.
The loss goes through the SDK's `forward_backward_custom` (a forward, the loss and its gradient
on this side, a weighted cross_entropy backward on the server).

A plain script over the SDK: a typed config, then `main(config)`; `eztinker dpo --help`.
Outputs under `output_dir`: `dpo_buffer.jsonl` (buffer mode: every problem's candidates and the
pair picked), `dpo_results.json` (config, per-epoch metrics, timings, checkpoints) and
`dpo_accuracy.png`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from .. import AdamParams, Datum, ServiceClient, TrainingClient, datum_from_messages
from ..chat import loss_weights
from ..tasks import TASK_NAMES, Problem, get_task
from ._cli import setting
from ._epochs import EpochLog, RecipeFiles, fmt, test_summary
from ._results import NUMBER, PERCENT, mean, open_run
from ._rollouts import Candidate, Rollouts, append_jsonl, best_correct, buffer_entry, load_problems, progress_bar
from ._settings import TaskRecipeSettings

if TYPE_CHECKING:
    import torch

BUFFER_FILE = "dpo_buffer.jsonl"
RESULTS_FILE = "dpo_results.json"
PLOT_FILE = "dpo_accuracy.png"
CHECKPOINT_PREFIX = "dpo_epoch_"
FILES = RecipeFiles(results=RESULTS_FILE, plot=PLOT_FILE, checkpoint_prefix=CHECKPOINT_PREFIX)
METRICS = ("loss", "margin", "correct", "chosen_reward", "rejected_reward", "chosen_nll")  # summed per micro-batch


@dataclass
class Config(TaskRecipeSettings):
    """Every field but `reward_fn` is also an `eztinker dpo` flag, with this help and default
    (the shared ones are described in `_settings.py`)."""

    task: str = setting("arithmetic", "Problem set: buffer pairs and held-out evaluation.", choices=TASK_NAMES)
    max_samples: int = setting(64, "Training problems (buffer pairs).")
    epochs: int = setting(3, "Rounds of training (on fresh buffer pairs unless --pairs-file) and evaluation.")
    learning_rate: float = setting(1e-3, "Adam learning rate of the first epoch.")
    max_tokens: int = setting(64, "New tokens per candidate.")
    eval_size: int = setting(100, "Held-out test problems (greedy); 0 skips evaluation.")
    batch_size: int = setting(8, "Pairs per optimizer step (gradient accumulated over the batch).")
    micro_batch_size: int = setting(4, "Pairs per forward_backward_custom request.")
    checkpoint: bool = setting(False, "Save dpo_epoch_<k> every epoch.")
    resume_from: str | None = setting(None, "Continue after '<run_id>/dpo_epoch_<k>'.")
    pairs_file: Path | None = setting(
        None, "JSONL of {prompt, chosen, rejected} (prompt: text or chat messages); else pairs from the run's samples."
    )
    beta: float = setting(0.1, "DPO beta: the strength of the pull toward the reference.")
    sft_weight: float = setting(
        0.0,
        "Weight of an SFT term, the chosen reply's mean per-token NLL (as in RPO): it keeps DPO from "
        "lowering the chosen reply's likelihood along with the rejected one's.",
    )
    length_normalize: bool = setting(
        False,
        "Divide each reply's log-ratio by its token count (SimPO / LN-DPO): no margin from length alone. "
        "The per-token ratios are small, so pair it with a larger --beta (e.g. 2).",
    )
    reference_checkpoint: str | None = setting(None, "Frozen reference '<run_id>/<name>'; default: the base model.")


@dataclass
class Pair:
    prompt: list[dict[str, str]]  # chat messages, ending on the user's turn
    chosen: str
    rejected: str


# ------------------------------------------------------------------------------ the loss
def dpo_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Per pair [P]: the implicit rewards, their margin and the DPO loss."""
    import torch  # here, not at the top: `eztinker --help` builds this Config and need not load torch

    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    return {
        "loss": -torch.nn.functional.logsigmoid(margin),
        "margin": margin,
        "correct": (margin > 0).float(),
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
    }


def reply_logprob(datum: Datum, logprobs: torch.Tensor) -> torch.Tensor:
    """The summed logprob of the datum's reply: the positions its weights mark."""
    import torch

    return (logprobs * torch.tensor(loss_weights(datum), dtype=logprobs.dtype)).sum()


def dpo_loss_fn(
    reference: Sequence[float],
    beta: float,
    normaliser: int,
    sft_weight: float = 0.0,
    length_normalize: bool = False,
) -> Callable:
    """A `forward_backward_custom` loss over datums [chosen_0, rejected_0, chosen_1, ...] whose
    reference reply logprobs are `reference` (same order): per pair the DPO loss plus
    `sft_weight` x the chosen reply's mean per-token NLL, summed and divided by `normaliser` (the
    optimizer batch's pair count, so accumulated micro-batches average over the batch). With
    `length_normalize` each reply's log-ratio is divided by its token count (as in SimPO and
    LN-DPO), so a margin cannot be won by making replies longer. Its metrics are the sums of
    METRICS over the micro-batch's pairs (`loss`: the DPO term alone)."""
    import torch

    ref = torch.tensor(reference, dtype=torch.float32)

    def loss_fn(data: Sequence[Datum], logprobs: list[torch.Tensor]):
        policy = torch.stack([reply_logprob(d, lp) for d, lp in zip(data, logprobs)])
        tokens = torch.tensor([max(sum(1 for w in loss_weights(d) if w), 1) for d in data], dtype=torch.float32)
        scale = tokens if length_normalize else torch.ones_like(tokens)
        policy_per, ref_per = policy / scale, ref / scale
        terms = dpo_terms(policy_per[0::2], policy_per[1::2], ref_per[0::2], ref_per[1::2], beta)
        terms["chosen_nll"] = -policy[0::2] / tokens[0::2]
        total = terms["loss"] + sft_weight * terms["chosen_nll"] if sft_weight else terms["loss"]
        return total.sum() / normaliser, {k: float(terms[k].detach().sum()) for k in METRICS}

    return loss_fn


# ----------------------------------------------------------------------------- the pairs
def read_pairs(path: Path) -> list[Pair]:
    """Pairs from JSONL; ValueError naming the file, line and field at fault."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with prompt, chosen and rejected")
            for key in ("prompt", "chosen", "rejected"):
                if key not in row:
                    raise ValueError(f"{where}: missing {key!r}")
            for key in ("chosen", "rejected"):
                if not isinstance(row[key], str) or not row[key].strip():
                    raise ValueError(f"{where}: {key!r} must be a non-empty string")
            pairs.append(Pair(_prompt_messages(row["prompt"], where), row["chosen"], row["rejected"]))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def _prompt_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(m, dict)
            and isinstance(m.get("content"), str)
            and m.get("role") in ("system", "user", "assistant")
            for m in prompt
        )
        and prompt[-1]["role"] == "user"
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError(f"{where}: 'prompt' must be text or chat messages ({{role, content}}) ending with a user turn")


def rejected_index(candidates: list[Candidate]) -> int | None:
    """The incorrect candidate the model finds likeliest: the mistake most worth unlearning."""
    wrong = [i for i, c in enumerate(candidates) if not c.correct]
    return max(wrong, key=lambda i: candidates[i].mean_logprob) if wrong else None


# ------------------------------------------------------------------------------------ recipe
class DPO:
    def __init__(self, config: Config, console: Console | None = None):
        self.config = config
        self.console = console or Console()
        self.task = get_task(config.task)
        self.output_dir = Path(config.output_dir)
        self.rng = random.Random(config.seed)
        self.rollouts = Rollouts(config, self.task, config.reward_fn, self.rng, self.console)

    # ------------------------------------------------------------------------ pairs
    def buffer_pairs(
        self, epoch: int, run: TrainingClient, problems: list[Problem]
    ) -> tuple[list[Pair], list[list[Candidate]]]:
        """Sample the run, keep one (best correct, likeliest incorrect) pair per problem that has
        both, and log every problem to the buffer file."""
        candidates = self.rollouts.sample(
            run, problems, self.config.num_candidates, greedy=False, label=f"epoch {epoch}: sample"
        )
        pairs, entries = [], []
        for problem, cands in zip(problems, candidates):
            chosen, rejected = best_correct(cands), rejected_index(cands)
            if chosen is not None and rejected is not None:
                pairs.append(Pair(self.task.messages_for(problem), cands[chosen].text, cands[rejected].text))
            else:
                chosen = rejected = None  # no pair from this problem
            entries.append(buffer_entry(epoch, problem, cands, chosen=chosen, rejected=rejected))
        append_jsonl(self.output_dir / BUFFER_FILE, entries)
        return pairs, candidates

    def datums(self, pairs: list[Pair], tokenizer) -> list[Datum]:
        """[chosen_0, rejected_0, chosen_1, ...]: each reply after its prompt, the reply weighted 1."""
        return [
            datum_from_messages(tokenizer, [*pair.prompt, {"role": "assistant", "content": text}])
            for pair in pairs
            for text in (pair.chosen, pair.rejected)
        ]

    def reference_logprobs(self, reference: TrainingClient, data: list[Datum]) -> list[float]:
        """Each datum's summed reply logprob under the frozen reference (requests sent together)."""
        import torch

        size = 2 * self.config.micro_batch_size
        futures = [reference.forward(data[i : i + size]) for i in range(0, len(data), size)]
        sums = []
        for start, future in zip(range(0, len(data), size), futures):
            for datum, row in zip(data[start : start + size], future.result().logprobs):
                sums.append(float(reply_logprob(datum, torch.tensor(row, dtype=torch.float32))))
        return sums

    # --------------------------------------------------------------------- training
    def train(
        self, run: TrainingClient, data: list[Datum], reference: list[float], learning_rate: float
    ) -> dict[str, Any]:
        """One pass over the pairs in shuffled order; the DPO metrics averaged over the pairs seen
        (each measured at its step's forward, before that step's update)."""
        c = self.config
        order = list(range(len(data) // 2))
        self.rng.shuffle(order)
        totals = dict.fromkeys(METRICS, 0.0)
        pairs_seen = steps = 0
        with progress_bar(self.console) as progress:
            bar = progress.add_task("train", total=len(order), acc="")
            for start in range(0, len(order), c.batch_size):
                batch = order[start : start + c.batch_size]
                results = []
                for m in range(0, len(batch), c.micro_batch_size):
                    micro = batch[m : m + c.micro_batch_size]
                    rows = [k for p in micro for k in (2 * p, 2 * p + 1)]
                    loss_fn = dpo_loss_fn(
                        [reference[k] for k in rows], c.beta, len(batch), c.sft_weight, c.length_normalize
                    )
                    results.append(run.forward_backward_custom([data[k] for k in rows], loss_fn))
                step = run.optim_step(AdamParams(learning_rate=learning_rate))
                for future in results:
                    for key, value in future.result().metrics.items():
                        totals[key] += value
                step.result()
                steps += 1
                pairs_seen += len(batch)
                progress.update(bar, advance=len(batch), acc=f"loss {totals['loss'] / pairs_seen:.3f}")
        metrics: dict[str, Any] = {"optimizer_steps": steps, "trained_pairs": pairs_seen}
        names = {
            "loss": "dpo_loss",
            "margin": "reward_margin",
            "correct": "reward_accuracy",
            "chosen_reward": "chosen_reward",
            "rejected_reward": "rejected_reward",
            "chosen_nll": "chosen_nll",
        }
        for key, name in names.items():
            metrics[name] = totals[key] / pairs_seen if pairs_seen else None
        return metrics

    # ------------------------------------------------------------------------- main
    def run(self) -> dict[str, Any]:
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fixed_pairs = read_pairs(c.pairs_file) if c.pairs_file else None
        service = ServiceClient(c.server_url, api_key=c.api_key)
        health = service.health()
        train: list[Problem] = []
        test: list[Problem] = []
        if fixed_pairs is None or c.eval_size > 0:
            train, test = load_problems(c, self.task)
            test = test if c.eval_size > 0 else []
        run, start_epoch = open_run(service, c, CHECKPOINT_PREFIX, self.output_dir / BUFFER_FILE)
        # A fresh adapter's update is zero (LoRA B starts at 0): this run *is* the base model.
        reference = (
            service.create_training_run(from_checkpoint=c.reference_checkpoint, seed=c.seed)
            if c.reference_checkpoint
            else service.create_training_run(lora_rank=1, seed=c.seed)
        )
        try:
            return self._epochs(service, run, reference, health.model, fixed_pairs, train, test, start_epoch)
        finally:
            reference.delete()

    def _epochs(
        self,
        service: ServiceClient,
        run: TrainingClient,
        reference: TrainingClient,
        model: str,
        fixed_pairs: list[Pair] | None,
        train: list[Problem],
        test: list[Problem],
        start_epoch: int,
    ) -> dict[str, Any]:
        c = self.config
        tokenizer = run.get_tokenizer()
        source = (
            f"{len(fixed_pairs)} pairs from {c.pairs_file}"
            if fixed_pairs
            else f"pairs from {len(train)} {c.task} problems"
        )
        self.console.print(
            f"[bold]DPO[/] (beta {c.beta}): model {model}, run {run.run_id}, {source}, "
            f"{len(test)} test problems, reference {c.reference_checkpoint or 'the base model'}, epochs "
            f"{start_epoch}..{c.epochs}"
        )
        log = EpochLog(c, FILES, self.console, self.rollouts, report=self._report)
        log.start(run, model, start_epoch, test)
        fixed = None  # the pairs file's datums and reference logprobs, computed once
        for epoch in log.epochs(start_epoch):
            times: dict[str, float] = {}
            entry: dict[str, Any] = {"epoch": epoch, "seconds": times}
            t = time.monotonic()
            if fixed_pairs is None:
                pairs, candidates = self.buffer_pairs(epoch, run, train)
                times["sample"] = time.monotonic() - t
                entry["train_accuracy"] = mean(x.correct for cands in candidates for x in cands)
                entry["coverage"] = mean(any(x.correct for x in cands) for cands in candidates)
                t = time.monotonic()
                data = self.datums(pairs, tokenizer)
                ref = self.reference_logprobs(reference, data)
            else:
                pairs = fixed_pairs
                if fixed is None:
                    fixed = (data := self.datums(pairs, tokenizer), self.reference_logprobs(reference, data))
                data, ref = fixed
            times["reference"] = time.monotonic() - t
            entry["pairs"] = len(pairs)
            t = time.monotonic()
            lr = c.learning_rate * c.lr_decay ** (epoch - 1)
            entry["learning_rate"] = lr
            entry.update(self.train(run, data, ref, lr) if pairs else {"optimizer_steps": 0, "trained_pairs": 0})
            times["train"] = time.monotonic() - t
            log.end_epoch(run, entry, test)
        return log.finish(
            run,
            test,
            f"DPO on {c.task} ({model}), beta {c.beta}",
            [
                ("train accuracy (candidates)", "train_accuracy", PERCENT),
                ("pairs", "pairs", str),
                ("DPO loss", "dpo_loss", NUMBER),
                ("reward margin", "reward_margin", NUMBER),
                ("implicit-reward accuracy", "reward_accuracy", PERCENT),
                ("chosen reward", "chosen_reward", NUMBER),
                ("rejected reward", "rejected_reward", NUMBER),
                ("chosen reply NLL per token", "chosen_nll", NUMBER),
            ],
            [("reward_accuracy", "implicit-reward accuracy (train pairs)")],
        )

    def _report(self, entry: dict[str, Any]) -> None:
        self.console.print(
            f"epoch {entry['epoch']}: {test_summary(entry)}{entry.get('pairs', 0)} pairs, "
            f"{entry.get('optimizer_steps', 0)} steps, loss {fmt(entry, 'dpo_loss', '.3f')}, "
            f"margin {fmt(entry, 'reward_margin', '.3f')}, reward acc {fmt(entry, 'reward_accuracy', '.1%')}"
        )


def main(config: Config) -> dict[str, Any]:
    return DPO(config).run()
