"""Batched sampling with a shared prefill and a KV cache.

Every prompt is prefilled once, and the prefix all prompts share (a system prompt, worked
examples) once per adapter; each prompt's KV cache then serves its N candidates (one copy shared
by them where the model allows, prompt_attention.py, else copied to each), and all candidates of
all prompts (of all requests, possibly of different runs) decode together. Only the
last position is ever projected to the vocabulary, and only for the rows still decoding: a row
that finishes stops costing vocabulary work at once, and leaves the decoder batch as soon as
enough rows have finished to make compacting the KV cache worth its copy.

Per decode step the vocabulary-sized work is a handful of passes over reused [rows, V] buffers
(no `torch.multinomial`, no sort; the one fresh [rows, V] tensor is the logits where the head's
packed weight serves, as oneDNN has no out= form, and its timing counts that): the logits are shifted by
their max, exponentiated once (which gives the temperature-1 log-normaliser for the logprobs), and a
token is drawn by inverse-CDF with one uniform per row from the request's seeded generator: first
over blocks of the vocabulary (one summing pass), then inside the chosen block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from ..types import SampledSequence, SampledToken, SamplingParams
from .head_lora import HeadLora
from .kv_cache import PreallocatedCache
from .output_projection import logits_into
from .packed_linear import PackedWeight
from .prompt_attention import SharedPromptCache
from .token_chooser import TokenChooser

# forward(input_ids_B_T, attention_mask_B_S, position_ids_B_T, cache, adapters) -> features_B_D of the
# last position: the final hidden state when a `head` is given to `sample`, else the logits.
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Cache, list[str | None]], torch.Tensor]

_COMPACT_FRACTION = 8  # drop finished rows from the decoder batch once they are >= 1/8 of it
_MIN_SHARED_PREFIX = 8  # a shorter common prompt prefix is not worth its own forward pass
_MIN_SHARED_ROW_TOKENS = 4096  # rows x prompt width from which candidates share their prompt's cache


@dataclass
class SampleSpec:
    """One request: its prompts, candidates per prompt and sampling parameters."""

    adapter: str | None  # None: the bare base model
    prompts: list[list[int]]
    num_samples: int
    params: SamplingParams
    top_logprobs: int = 0  # also the k most likely tokens (and logprobs) at every sampled position
    # Called from the sampling thread after every decode step with this request's new tokens
    # (streaming); it must be quick, e.g. hand them to an event loop.
    on_tokens: Callable[[list[SampledToken]], None] | None = None
    # Polled after every decode step: once it answers True (every consumer of the request is
    # gone), the request's rows stop decoding and `abandoned` is set; its results are partial.
    cancelled: Callable[[], bool] | None = None
    abandoned: bool = False


@dataclass
class OutputHead:
    """The output projection: logits = features @ weight.T (+ bias), computed into a reused buffer
    (by the packed weight, where it serves, into oneDNN's own new tensor)."""

    weight: torch.Tensor  # [V, D]
    bias: torch.Tensor | None = None
    packed: PackedWeight | None = None  # the weight packed for oneDNN (packed_linear.py)
    loras: dict[str, HeadLora] = field(default_factory=dict)  # adapters' LoRAs on the head (train_unembed)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def logits(
        self,
        features_B_D: torch.Tensor,
        out_B_V: torch.Tensor,
        row_adapters: Sequence[tuple[str | None, int, int]] = (),
    ) -> torch.Tensor:
        """The logits, in `out_B_V` or a new tensor (`logits_into`); rows [a, b) of each
        (adapter, a, b) in `row_adapters` also get that adapter's LoRA on the head, if it has one."""
        logits = logits_into(out_B_V, features_B_D, self.weight, self.bias, self.packed)
        for adapter, a, b in row_adapters if self.loras else ():
            lora = self.loras.get(adapter) if adapter is not None else None  # the base model: no LoRA
            if lora is not None:
                lora.add_to(logits[a:b], lora.down(features_B_D[a:b]))
        return logits


class _LogitsAreFeatures:
    """For a forward function that already returns logits."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def logits(self, features_B_D: torch.Tensor, out_B_V: torch.Tensor, row_adapters=()) -> torch.Tensor:
        return out_B_V.copy_(features_B_D)  # the forward went through the whole model, its head's LoRA included


@dataclass
class _Row:
    spec: int
    prompt: int
    sample: int
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    stop_reason: str | None = None


def sample(
    forward: ForwardFn,
    tokenizer: PreTrainedTokenizerBase,
    specs: list[SampleSpec],
    *,
    stop_token_ids: frozenset[int],
    pad_token_id: int,
    device: torch.device,
    head: OutputHead | None = None,
    share_prompts: bool = False,
) -> list[list[list[SampledSequence]]]:
    """Returns, per spec and per prompt, its `num_samples` candidates. `share_prompts`: the
    forward function runs decode steps with a `SharedPromptCache` (prompt_attention.py), so a
    prompt's candidates may share one copy of its KV cache instead of one copy each."""
    # Requests of the same adapter side by side: each adapter's rows stay one contiguous slice.
    first_seen: dict[str | None, int] = {}
    for s, spec in enumerate(specs):
        first_seen.setdefault(spec.adapter, s)
    order = sorted(range(len(specs)), key=lambda s: (first_seen[specs[s].adapter], s))
    prefill_rows = [(s, p) for s in order for p in range(len(specs[s].prompts))]
    prompts = [specs[s].prompts[p] for s, p in prefill_rows]
    max_tokens = max(spec.params.max_tokens for spec in specs)
    share_prompts = share_prompts and _worth_sharing(prompts, [specs[s].num_samples for s, _ in prefill_rows])
    cache: Cache  # the prefill's, or the shared-prompt one that replaces it
    features, attention_mask, position_ids, cache = _prefill(
        forward,
        prompts,
        [specs[s].adapter for s, _ in prefill_rows],
        0 if share_prompts else max_tokens,
        pad_token_id,
        device,
    )
    logits_head = head if head is not None else _LogitsAreFeatures(features.shape[-1])

    # Share each prompt's prefill with its candidates: row i of the prefill -> num_samples rows.
    expand = torch.tensor(
        [i for i, (s, _) in enumerate(prefill_rows) for _ in range(specs[s].num_samples)],
        device=device,
    )
    if share_prompts:
        cache = SharedPromptCache(cache, attention_mask, expand, capacity=max_tokens)
    else:
        cache.batch_select_indices(expand)
    features, attention_mask = features[expand], attention_mask[expand]
    next_position = position_ids[expand, -1:] + 1
    rows = [
        _Row(spec=s, prompt=p, sample=k, max_tokens=specs[s].params.max_tokens)
        for s, p in prefill_rows
        for k in range(specs[s].num_samples)
    ]
    stop_strings = [spec.params.stop for spec in specs]
    # The model's (unless the request turns them off) and the request's.
    stop_ids = [
        (frozenset() if spec.params.ignore_eos else stop_token_ids) | frozenset(spec.params.stop_token_ids)
        for spec in specs
    ]
    chooser = TokenChooser(specs, logits_head, len(rows), device, stop_ids)
    listening = any(spec.on_tokens is not None for spec in specs)
    cancellable = [s for s, spec in enumerate(specs) if spec.cancelled is not None]
    batch = list(range(len(rows)))  # the decoder batch: indices into `rows`, finished ones included
    live = list(range(len(rows)))  # positions in `batch` of the rows still decoding

    while live:
        live_rows = [rows[batch[k]] for k in live]
        live_index = None if len(live) == len(batch) else torch.tensor(live, device=device)
        tokens, logprobs, tops = chooser.choose(
            features if live_index is None else features[live_index], [row.spec for row in live_rows], live_rows
        )
        still_live: list[int] = []
        for k, row, token, logprob, top in zip(live, live_rows, tokens.tolist(), logprobs.tolist(), tops):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            if top is not None:
                row.top.append(top)
            if len(row.tokens) < specs[row.spec].params.min_tokens:  # nothing stops it yet (as in vLLM)
                still_live.append(k)
            elif token in stop_ids[row.spec] or _hit_stop_string(row, stop_strings[row.spec], tokenizer):
                row.stop_reason = "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.stop_reason = "length"
            else:
                still_live.append(k)
        if listening:
            _report(specs, live_rows, tops)
        if cancellable and (cut := _newly_abandoned(specs, cancellable)):
            still_live = [k for k in still_live if rows[batch[k]].spec not in cut]
        if not still_live:
            break
        # Next input: each live row's new token; finished rows still in the batch repeat theirs.
        step_tokens = torch.full((len(batch), 1), pad_token_id, dtype=torch.long)
        for k, row in zip(live, live_rows):
            step_tokens[k, 0] = row.tokens[-1]
        step_tokens = step_tokens.to(device)
        if (len(batch) - len(still_live)) * _COMPACT_FRACTION >= len(batch):
            keep = torch.tensor(still_live, device=device)
            cache.batch_select_indices(keep)
            attention_mask, next_position, step_tokens = attention_mask[keep], next_position[keep], step_tokens[keep]
            batch = [batch[k] for k in still_live]
            live = list(range(len(batch)))
        else:
            live = still_live
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(batch), 1)], dim=-1)
        features = forward(
            step_tokens, attention_mask, next_position, cache, [specs[rows[i].spec].adapter for i in batch]
        )
        next_position = next_position + 1

    results: list[list[list[SampledSequence]]] = [[[] for _ in spec.prompts] for spec in specs]
    for row in rows:
        results[row.spec][row.prompt].append(
            SampledSequence(
                text=_visible_text(row, stop_ids[row.spec], stop_strings[row.spec], tokenizer),
                tokens=row.tokens,
                logprobs=row.logprobs,
                stop_reason=row.stop_reason or "length",
                top_logprobs=row.top if specs[row.spec].top_logprobs else None,
            )
        )
    return results


def _newly_abandoned(specs: list[SampleSpec], cancellable: list[int]) -> set[int]:
    """The specs whose consumers went away since the last step (marked abandoned)."""
    cut = {s for s in cancellable if not specs[s].abandoned and cast(Callable[[], bool], specs[s].cancelled)()}
    for s in cut:
        specs[s].abandoned = True
    return cut


def _report(specs: list[SampleSpec], live_rows: list[_Row], tops: list) -> None:
    """Hand each listening request the tokens its rows just drew (one call per request and step)."""
    new: dict[int, list[SampledToken]] = {}
    for row, top in zip(live_rows, tops):
        if specs[row.spec].on_tokens is not None:
            new.setdefault(row.spec, []).append(
                SampledToken(row.prompt, row.sample, row.tokens[-1], row.logprobs[-1], top, row.stop_reason)
            )
    for s, sampled in new.items():
        on_tokens = specs[s].on_tokens
        assert on_tokens is not None  # only listening specs were collected
        on_tokens(sampled)


def _prefill(
    forward: ForwardFn,
    prompts: list[list[int]],
    adapters: list[str | None],
    max_tokens: int,
    pad_token_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PreallocatedCache]:
    """Runs the prompts through the model; returns the last position's features, the attention
    mask and position ids, and the filled cache.

    Prompts usually start alike (a chat template's system prompt, worked examples): their common
    prefix is computed once per adapter and copied to every row, and only the rest is prefilled
    per prompt, left-padded, so a row's mask reads [prefix][padding][its own tokens].
    """
    shared = _common_prefix_length(prompts)
    if len(prompts) < 2 or shared < _MIN_SHARED_PREFIX:
        shared = 0
    groups = list(dict.fromkeys(adapters))  # the distinct adapters, in order of first use
    suffix_ids, suffix_mask = left_pad([p[shared:] for p in prompts], pad_token_id, device)
    cache = PreallocatedCache(shared + suffix_ids.shape[1] + max_tokens)
    if shared:
        prefix = torch.tensor(prompts[0][:shared], device=device).expand(len(groups), shared)
        forward(prefix, torch.ones_like(prefix), torch.arange(shared, device=device).expand_as(prefix), cache, groups)
        cache.batch_select_indices(torch.tensor([groups.index(a) for a in adapters], device=device))
    attention_mask = torch.cat([suffix_mask.new_ones(len(prompts), shared), suffix_mask], dim=-1)
    position_ids = shared + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    features = forward(suffix_ids, attention_mask, position_ids, cache, adapters)
    return features, attention_mask, position_ids, cache


def _worth_sharing(prompts: list[list[int]], candidates: list[int]) -> bool:
    """Whether sharing each prompt's cache among its candidates beats copying it to each: with
    two candidates a prompt on average, and copies big enough to cost memory traffic (small ones
    were slower shared, bench/shared_prefix.py: the split attention has more, smaller ops)."""
    rows = sum(candidates)
    return rows >= 2 * len(prompts) and rows * max(len(p) for p in prompts) >= _MIN_SHARED_ROW_TOKENS


def _common_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens all prompts start with, leaving each at least one token of its own to prefill
    (its last position's features are what the first token is drawn from)."""
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


# -------------------------------------------------------------------------------- token choice
def left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"):
    """[B, width] token ids and attention mask, each prompt right-aligned (padding on the left)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[i, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


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
    text = cast(str, tokenizer.decode(tokens, skip_special_tokens=True))  # one sequence: one string
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text
