"""Scoring token sequences under an adapter (a run's, a snapshot's, or none): the logprob of each
response given a prompt (`score`), and of every prompt position given the tokens before it
(`prompt_logprobs`), with the extras prompt_scoring.py computes. Inputs are checked by the caller.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..types import ResponseScore
from . import prompt_scoring
from .forward import ForwardPath
from .prompt_scoring import PromptExtras


@dataclass
class PromptLogprobs:
    """Per prompt position i: log p(prompt[i] | prompt[:i]) and, if asked, the k most likely
    [token_id, logprob] pairs of that distribution (most likely first). Position 0 has neither."""

    logprobs: list[float | None]
    topk: list[list[list] | None] | None
    extras: prompt_scoring.ExtrasResult | None = None  # what PromptExtras asked for


@torch.no_grad()
def score(
    forward: ForwardPath, microbatch_tokens: int, adapter: str | None, prompt: list[int], responses: list[list[int]]
) -> list[ResponseScore]:
    """Logprob of each response given the prompt. Responses go through in micro-batches of at most
    `microbatch_tokens` padded tokens (one response at least), longest first, so memory is bounded
    however many there are."""
    order = sorted(range(len(responses)), key=lambda i: -len(responses[i]))
    batches: list[list[int]] = []
    for i in order:  # the first of a batch is its widest
        width = len(prompt) + len(responses[batches[-1][0]]) if batches else 0
        if batches and (len(batches[-1]) + 1) * width <= microbatch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    logprobs: list[torch.Tensor] = [torch.empty(0)] * len(responses)
    for batch in batches:
        chunk = [responses[i] for i in batch]
        input_ids, attention_mask = forward.right_pad([prompt + r for r in chunk])
        positions = torch.zeros(input_ids.shape, dtype=torch.bool)
        for row, r in enumerate(chunk):
            positions[row, len(prompt) - 1 : len(prompt) - 1 + len(r)] = True
        targets = torch.cat(
            [torch.tensor(r, dtype=torch.long) for r in chunk if r] or [torch.empty(0, dtype=torch.long)]
        )
        hidden = forward.hidden_states(adapter, input_ids, attention_mask)
        hidden_N_H, targets = hidden[positions.to(hidden.device)], targets.to(hidden.device)
        chunk_logprobs = forward.logprobs(hidden_N_H, targets, adapter=adapter)[0].cpu()
        offset = 0
        for i, r in zip(batch, chunk):
            logprobs[i] = chunk_logprobs[offset : offset + len(r)]
            offset += len(r)
    scores = []
    for r, lp in zip(responses, logprobs):
        total = float(lp.sum()) if len(r) else 0.0
        scores.append(ResponseScore(sum_logprob=total, mean_logprob=total / max(len(r), 1), num_tokens=len(r)))
    return scores


@torch.no_grad()
def prompt_logprobs(
    forward: ForwardPath,
    adapter: str | None,
    prompts: list[list[int]],
    topk: int = 0,
    last_n: int | None = None,
    extras: list[PromptExtras] | None = None,
) -> list[PromptLogprobs]:
    """Per (non-empty) prompt, the logprob (temperature 1) of each of its tokens given the tokens
    before it, and with topk > 0 the k most likely tokens there. `last_n`: only each prompt's last
    n tokens are scored (the rest None). `extras` (one per prompt): target ids' logprobs and draws
    at every position (prompt_scoring.py)."""
    input_ids, attention_mask = forward.right_pad(prompts)
    scored = [len(p) - 1 if last_n is None else min(last_n, len(p) - 1) for p in prompts]
    positions_B_T = torch.zeros(input_ids.shape, dtype=torch.bool)  # position t predicts token t + 1
    for i, (p, n) in enumerate(zip(prompts, scored)):
        positions_B_T[i, len(p) - 1 - n : len(p) - 1] = True
    targets_N = torch.tensor(
        [t for p, n in zip(prompts, scored) for t in p[len(p) - n :]], dtype=torch.long, device=input_ids.device
    )
    hidden = forward.hidden_states(adapter, input_ids, attention_mask)
    logprobs_N, top_N_K, ids_N_K = forward.logprobs(
        hidden[positions_B_T.to(hidden.device)], targets_N, topk, adapter=adapter
    )
    logprobs, top, ids = logprobs_N.tolist(), top_N_K.tolist(), ids_N_K.tolist()
    results, offset = [], 0
    for i, (p, n) in enumerate(zip(prompts, scored)):
        rows = range(offset, offset + n)
        offset += n
        unscored = [None] * (len(p) - n)
        extra = None
        if extras is not None and (extras[i].targets is not None or extras[i].alt_k):
            extra = prompt_scoring.score_prompt(
                hidden[i, : len(p) - 1],
                extras[i],
                functools.partial(forward.log_softmax, adapter=adapter),
                prompt_scoring.rows_per_chunk(forward.base.vocab_size),
            )
        results.append(
            PromptLogprobs(
                logprobs=unscored + [logprobs[r] for r in rows],
                topk=unscored + [[[t, lp] for t, lp in zip(ids[r], top[r])] for r in rows] if topk else None,
                extras=extra,
            )
        )
    return results
