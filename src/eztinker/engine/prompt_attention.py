"""Decode-time attention that reads each prompt's keys and values once for all its candidates.

Without it, the sampler copies every prompt's prefilled KV cache to each of its N candidate rows,
and every decode step reads all N copies: at 16 prompts x 8 candidates of GSM8K length that is most
of the attention's memory traffic, and attention about a third of the step. With `SharedPromptCache`
a prompt's keys and values stay one copy, and each row keeps only those of the tokens it generated.
A decode step's attention is computed in two parts, then merged by their log-sum-exp (the same
softmax, to rounding; each part by the fused CPU kernel sdpa uses, or matmuls elsewhere):
  * the prompt part: the candidates of a prompt are extra query rows of one matmul against that
    prompt's keys (padding masked out);
  * the generated part: each row against its own generated keys (all valid, none masked).

It is registered with transformers as an attention implementation and switched on only around the
sampler's decode steps (`attending`); models it cannot reproduce exactly (sliding windows, logit
soft-capping, attention sinks) keep the copying path: see `supports`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import cast

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from . import device_paths
from .kv_cache import PreallocatedLayer

ATTENTION_NAME = "eztinker_shared_prompt"
# Plain causal full attention with the standard q/k/v layout (GQA included); checked, not assumed.
_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3"})

_active: ContextVar[SharedPromptCache | None] = ContextVar("eztinker_shared_prompt_cache", default=None)


def supports(config: PretrainedConfig) -> bool:
    """Whether this model's attention is what `_attention` computes (sdpa-equivalent, full, causal)."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (
        config.model_type in _MODEL_TYPES
        and config._attn_implementation == "sdpa"
        and not getattr(config, "use_sliding_window", False)
        and all(kind == "full_attention" for kind in layer_types)
        and getattr(config, "attn_logit_softcapping", None) is None
    )


class _GeneratedLayer(PreallocatedLayer):
    """One layer: the prompts' keys/values [P, kv, Lp, D] (shared, read only) and, in the buffer,
    each row's generated ones [R, kv, capacity, D]."""

    def __init__(self, prompt_keys: torch.Tensor, prompt_values: torch.Tensor, capacity: int):
        super().__init__(capacity)
        self.prompt_keys, self.prompt_values = prompt_keys, prompt_values

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[-2] + self.length


def _prefilled(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefilled prompt cache layer's keys and values (`supports` admits full-attention layers alone)."""
    full = cast(CacheLayerMixin, layer)
    assert full.keys is not None and full.values is not None  # the prompts were prefilled
    return full.keys, full.values


class SharedPromptCache(DynamicCache):
    """The decode cache: `prompt_cache`'s layers (one row per prompt, `prompt_mask` [P, Lp] marks
    real tokens) shared by the rows; `row_prompt[r]` is the prompt of row r."""

    def __init__(self, prompt_cache: Cache, prompt_mask: torch.Tensor, row_prompt: torch.Tensor, capacity: int):
        prompt_layers = [_prefilled(layer) for layer in prompt_cache.layers]
        Cache.__init__(self, layers=[_GeneratedLayer(keys, values, capacity) for keys, values in prompt_layers])
        # [P, 1, 1, Lp]: -inf at padding, 0 at the prompts' tokens (an additive mask).
        self.prompt_bias = torch.zeros(
            prompt_mask.shape, dtype=prompt_layers[0][0].dtype, device=prompt_mask.device
        ).masked_fill_(~prompt_mask.bool(), float("-inf"))[:, None, None, :]
        self._place(row_prompt)

    def _place(self, row_prompt: torch.Tensor) -> None:
        """Each row's slot among its prompt's rows: queries go to a [P, slots] grid for the prompt part."""
        self.row_prompt = row_prompt
        counts = torch.bincount(row_prompt, minlength=self.prompt_bias.shape[0])
        self.slots = int(counts.max())
        first = torch.cumsum(counts, 0) - counts  # rows stay grouped by prompt, in prompt order
        self.row_slot = torch.arange(len(row_prompt), device=row_prompt.device) - first[row_prompt]
        if not bool((row_prompt[1:] >= row_prompt[:-1]).all()):
            raise ValueError("rows must be grouped by prompt")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._place(self.row_prompt[indices])

    def attend(self, layer_idx: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
        """query [R, H, 1, D]; keys/values: the rows' generated ones [R, kv, Lg, D]. -> [R, 1, H, D]."""
        rows, heads, q_len, dim = query.shape
        if q_len != 1:
            raise ValueError("shared-prompt attention is for decode steps (one new token per row)")
        layer = cast(_GeneratedLayer, self.layers[layer_idx])  # __init__ made them all
        prompts, kv = layer.prompt_keys.shape[:2]
        rep, slots = heads // kv, self.slots
        q = query[:, :, 0]  # [R, H, D]
        grid = q.new_zeros(prompts, slots, heads, dim)
        grid[self.row_prompt, self.row_slot] = q
        grid = grid.view(prompts, slots, kv, rep, dim).transpose(1, 2).reshape(prompts, kv, slots * rep, dim)
        prompt_out, prompt_lse = _part(grid, layer.prompt_keys, layer.prompt_values, scale, self.prompt_bias)

        def to_rows(x: torch.Tensor) -> torch.Tensor:  # [P, kv, slots * rep, X] -> [R, kv, rep, X]
            x = x.view(prompts, kv, slots, rep, x.shape[-1]).transpose(1, 2)
            return x[self.row_prompt, self.row_slot]

        prompt_out, prompt_lse = to_rows(prompt_out), to_rows(prompt_lse)
        own_out, own_lse = _part(q.view(rows, kv, rep, dim), keys, values, scale, None)
        # Merged in float32 (the parts' log-sum-exps are float32 on every path), then back to the
        # queries' dtype: a bf16 model's attention output stays bf16.
        prompt_weight = torch.sigmoid(
            prompt_lse.float() - own_lse.float()
        )  # the prompt part's share of the softmax mass
        own_out = own_out.float()
        out = own_out + (prompt_out.float() - own_out) * prompt_weight
        return out.to(query.dtype).reshape(rows, 1, heads, dim)


def _part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None):
    """Softmax attention over one part of the keys: its output [..., Lq, D] and the log-sum-exp of
    its scores [..., Lq, 1], by which two parts merge exactly. `bias`: 0 or -inf per key (padding)."""
    if _fused_kernel(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
        return out, lse.unsqueeze(-1)
    # Scores and softmax in float32, as fused attention kernels keep them: bf16 scores (3 significant
    # digits) moved a bf16 model's sampled logprobs away from the trainer's sdpa ones.
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    if bias is not None:
        scores.add_(bias)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(scores.sub_(lse).exp_().to(v.dtype), v), lse


def _fused_kernel(q: torch.Tensor) -> bool:
    """Whether to use the fused kernel sdpa runs on CPU, which also returns the log-sum-exp (faster
    than the matmuls and softmax written out: docs/performance.md, "Engine figures")."""
    return device_paths.cpu_kernels(q.device)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cache = _active.get()
    if cache is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention outside the sampler's decode steps")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return cache.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(ATTENTION_NAME, _attention)


@contextmanager
def attending(cache: SharedPromptCache, config: PretrainedConfig) -> Iterator[None]:
    """Within: the model's attention reads `cache` in two parts (for one forward of decode steps)."""
    previous = config._attn_implementation
    token = _active.set(cache)
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _active.reset(token)
