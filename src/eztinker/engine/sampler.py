"""Batched sampling with a shared prefill and a KV cache.

Every prompt is prefilled once; its KV cache is then copied to its N candidates, and all
candidates of all prompts (of all requests, possibly of different runs) decode together. Rows
that finish leave the batch at once, so one long candidate does not keep 127 finished ones
decoding. Only the last position's logits are ever computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from ..types import SampledSequence, SamplingParams

# forward(input_ids_B_T, attention_mask_B_S, position_ids_B_T, cache, adapters) -> logits_B_V
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache, list[str | None]], torch.Tensor]


@dataclass
class SampleSpec:
    """One request: its prompts, candidates per prompt and sampling parameters."""

    adapter: str | None  # None: the bare base model
    prompts: list[list[int]]
    num_samples: int
    params: SamplingParams


@dataclass
class _Row:
    spec: int
    prompt: int
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


def sample(
    forward: ForwardFn,
    tokenizer: PreTrainedTokenizerBase,
    specs: list[SampleSpec],
    *,
    stop_token_ids: frozenset[int],
    pad_token_id: int,
    device: torch.device,
) -> list[list[list[SampledSequence]]]:
    """Returns, per spec and per prompt, its `num_samples` candidates."""
    prefill_rows = [(s, p) for s, spec in enumerate(specs) for p in range(len(spec.prompts))]
    prompts = [specs[s].prompts[p] for s, p in prefill_rows]
    input_ids, attention_mask = _left_pad(prompts, pad_token_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = forward(
        input_ids, attention_mask, position_ids, cache, [specs[s].adapter for s, _ in prefill_rows]
    )

    # Share each prompt's prefill with its candidates: row i of the prefill -> num_samples rows.
    expand = torch.tensor(
        [i for i, (s, _) in enumerate(prefill_rows) for _ in range(specs[s].num_samples)],
        device=device,
    )
    cache.batch_select_indices(expand)
    logits, attention_mask = logits[expand], attention_mask[expand]
    next_position = position_ids[expand, -1:] + 1
    rows = [
        _Row(spec=s, prompt=p, max_tokens=specs[s].params.max_tokens)
        for s, p in prefill_rows
        for _ in range(specs[s].num_samples)
    ]
    generators = [_generator(spec.params.seed, device) for spec in specs]
    stop_strings = [spec.params.stop for spec in specs]
    active = list(range(len(rows)))  # indices into `rows` of the sequences still decoding

    while active:
        tokens, logprobs = _choose_tokens(logits, [rows[i] for i in active], specs, generators)
        still_active: list[int] = []
        for k, i in enumerate(active):
            row = rows[i]
            row.tokens.append(int(tokens[k]))
            row.logprobs.append(float(logprobs[k]))
            if row.tokens[-1] in stop_token_ids or _hit_stop_string(row, stop_strings[row.spec], tokenizer):
                row.stop_reason = "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.stop_reason = "length"
            else:
                still_active.append(k)
        if not still_active:
            break
        keep = torch.tensor(still_active, device=device)
        if len(still_active) < len(active):
            cache.batch_select_indices(keep)
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        step_tokens = tokens[keep].unsqueeze(-1)
        active = [active[k] for k in still_active]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=-1)
        logits = forward(
            step_tokens, attention_mask, next_position, cache, [specs[rows[i].spec].adapter for i in active]
        )
        next_position = next_position + 1

    results: list[list[list[SampledSequence]]] = [[[] for _ in spec.prompts] for spec in specs]
    for row in rows:
        results[row.spec][row.prompt].append(
            SampledSequence(
                text=_visible_text(row, stop_token_ids, stop_strings[row.spec], tokenizer),
                tokens=row.tokens,
                logprobs=row.logprobs,
                stop_reason=row.stop_reason or "length",
            )
        )
    return results


def _left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device):
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[i, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _choose_tokens(
    logits_B_V: torch.Tensor,
    rows: list[_Row],
    specs: list[SampleSpec],
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each row's next token with its request's parameters; return tokens and their logprobs."""
    logits_B_V = logits_B_V.float()
    chosen = torch.empty(len(rows), dtype=torch.long, device=logits_B_V.device)
    by_spec: dict[int, list[int]] = {}
    for k, row in enumerate(rows):
        by_spec.setdefault(row.spec, []).append(k)
    for s, members in by_spec.items():
        index = torch.tensor(members, device=logits_B_V.device)
        chosen[index] = _pick(logits_B_V[index], specs[s].params, generators[s])
    # Logprobs under the model itself (temperature 1), as importance-sampling losses expect.
    logprobs = torch.log_softmax(logits_B_V, dim=-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    return chosen, logprobs


def _pick(logits_B_V: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    if params.temperature == 0:
        return logits_B_V.argmax(dim=-1)
    logits_B_V = logits_B_V / params.temperature
    if 0 < params.top_k < logits_B_V.shape[-1]:
        kth = torch.topk(logits_B_V, params.top_k, dim=-1).values[:, -1:]
        logits_B_V = logits_B_V.masked_fill(logits_B_V < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits_B_V.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already cover top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_B_V = logits_B_V.masked_fill(drop, float("-inf"))
    probs = logits_B_V.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _hit_stop_string(row: _Row, stops: list[str], tokenizer: PreTrainedTokenizerBase) -> bool:
    if not stops:
        return False
    # A token carries at least one byte, so the tail covers any stop string just completed.
    tail_tokens = max(len(s.encode()) for s in stops) + 4  # bytes: a token may be one byte
    tail = tokenizer.decode(row.tokens[-tail_tokens:], skip_special_tokens=True)
    return any(s in tail for s in stops)


def _visible_text(
    row: _Row, stop_token_ids: frozenset[int], stops: list[str], tokenizer: PreTrainedTokenizerBase
) -> str:
    tokens = row.tokens[:-1] if row.tokens and row.tokens[-1] in stop_token_ids else row.tokens
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text
