"""Rewards for a problem's candidates, behind one interface: `scorer(problem, replies) -> rewards`.

* `VerifierScorer`: 1.0 when the task's verifier (Math-Verify against the gold answer, or a
  `reward_fn` given in Python) accepts the reply, else 0.0.
* `RewardModelScorer`: a Hugging Face sequence-classification model loaded in this process (the
  client's, not the server's), scoring the prompt and reply as one chat, in batches.
* `JudgeScorer`: asks a base model on the server whether the reply's final answer matches the
  reference answer; 1.0 for yes, 0.0 for no (greedy, so a reply always gets the same verdict).

A recipe picks one with `--scorer` (`make_scorer`); a group is scored in one call so a model
scorer can batch it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from .. import SamplingParams, ServiceClient
from ..tasks import Problem, Task

SCORER_NAMES = ("verifier", "reward-model", "judge")


class Scorer(Protocol):
    def __call__(self, problem: Problem, replies: Sequence[str]) -> list[float]: ...


class VerifierScorer:
    def __init__(self, task: Task, reward_fn=None):
        self.is_correct = reward_fn or task.is_correct

    def __call__(self, problem: Problem, replies: Sequence[str]) -> list[float]:
        return [1.0 if self.is_correct(reply, problem) else 0.0 for reply in replies]


class RewardModelScorer:
    """Reward = the model's score of (prompt, reply): the logit of a one-label head, or the
    probability of the last label of a several-label one (the "good" class by convention)."""

    def __init__(self, name_or_path: str, task: Task, batch_size: int = 8):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.task, self.batch_size, self.torch = task, batch_size, torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=torch.float32).eval()
        except OSError as e:  # not a folder with a model, and not on the Hub (or offline)
            raise ValueError(f"reward model {name_or_path!r}: {e}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # a batch's padding is found by this id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def text(self, problem: Problem, reply: str) -> str:
        messages = [*self.task.messages_for(problem), {"role": "assistant", "content": reply}]
        if self.tokenizer.chat_template:
            # tokenize=False returns the text; transformers types the result as every mode's union.
            return self.tokenizer.apply_chat_template(messages, tokenize=False)  # type: ignore[return-value]
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)

    def __call__(self, problem: Problem, replies: Sequence[str]) -> list[float]:
        torch = self.torch
        rewards: list[float] = []
        for start in range(0, len(replies), self.batch_size):
            texts = [self.text(problem, r) for r in replies[start : start + self.batch_size]]
            batch = self.tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=min(self.tokenizer.model_max_length, 4096),
            )
            with torch.inference_mode():
                logits = self.model(**batch).logits.float()
            values = logits[:, 0] if logits.shape[1] == 1 else logits.softmax(-1)[:, -1]
            rewards.extend(values.tolist())
        return rewards


JUDGE_PROMPT = """You are grading a student's answer to a math problem.

Problem: {question}

Reference answer: {gold}

Student's solution: {reply}

Does the student's final answer equal the reference answer? Reply with one word: yes or no."""


class JudgeScorer:
    """An LLM judge: a base model on the server, asked greedily, one request per group."""

    def __init__(self, service: ServiceClient, model: str | None, max_tokens: int = 4):
        self.service, self.model = service, model
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    def __call__(self, problem: Problem, replies: Sequence[str]) -> list[float]:
        prompts = [
            [{"role": "user", "content": JUDGE_PROMPT.format(question=problem.question, gold=problem.gold, reply=r)}]
            for r in replies
        ]
        result = self.service.sample(prompts, 1, self.params, base_model=self.model).result()
        return [verdict(candidates[0].text) for candidates in result.sequences]


def verdict(text: str) -> float:
    """1.0 when the judge's reply starts with yes (or says it before any no), else 0.0."""
    match = re.search(r"\b(yes|no|correct|incorrect)\b", text.lower())
    return 1.0 if match and match.group(1) in ("yes", "correct") else 0.0


def make_scorer(config: Any, task: Task, service: ServiceClient) -> Scorer:
    """The config's scorer: `scorer` (one of SCORER_NAMES), `reward_model`, `judge_model`, `reward_fn`."""
    if config.scorer == "verifier":
        return VerifierScorer(task, config.reward_fn)
    if config.scorer == "reward-model":
        if not config.reward_model:
            raise ValueError("--scorer reward-model needs --reward-model (a folder or a Hub id)")
        return RewardModelScorer(config.reward_model, task)
    if config.scorer == "judge":
        return JudgeScorer(service, config.judge_model)
    raise ValueError(f"unknown scorer {config.scorer!r}; valid: {', '.join(SCORER_NAMES)}")
