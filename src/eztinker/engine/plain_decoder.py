"""One decode step of a llama-family decoder as plain tensor operations.

A sampler decode step feeds one new token per row through the model. Through transformers'
modules a step of SmolLM2-135M at 4 rows took 69 ms, of which the matmuls were 31: the rest was
Python around them (module calls, hooks and decorators, a causal mask built every step). For the
models `prompt_attention` already reads exactly (llama, qwen2, qwen3: SiLU MLP, sdpa, full causal
attention), `DecodeStep` computes the same step from the same parameters with nothing between the
operations: a padding mask once per step, then per layer RMSNorm, q/k/v projections (plus the
stacked LoRA updates), RoPE, the cache write, attention (sdpa over the row's cache, packed per
key/value head as transformers does for one query, or the shared prompt cache's two-part
attention), o_proj and the MLP. Prefill (many tokens a row) keeps transformers' path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import peft
import torch
import torch.nn.functional as F
from . import prompt_attention

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraUpdates(Protocol):
    """Adds the rows' LoRA updates of `module` for its input `x` [N, in] to its base output `out` [N, out]."""

    def add_update(self, module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class _Projection:
    module: torch.nn.Module  # the model's own (peft-wrapped or plain) linear, the key of its LoRA update
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class _Layer:
    index: int
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    q: _Projection
    k: _Projection
    v: _Projection
    o: _Projection
    gate: _Projection
    up: _Projection
    down: _Projection
    q_norm: torch.Tensor | None  # qwen3 normalises each head's queries and keys before RoPE
    k_norm: torch.Tensor | None


def supports(decoder: torch.nn.Module, config) -> bool:
    """Whether `decoder` (the model's base, e.g. LlamaModel) is the structure `DecodeStep` computes."""
    if not prompt_attention.supports(config) or config.hidden_act != "silu":
        return False
    try:
        layers = decoder.layers[: config.num_hidden_layers]
        return type(decoder.embed_tokens) is torch.nn.Embedding and all(
            _base_linear(getattr(layer.self_attn if name in _PROJECTIONS[:4] else layer.mlp, name)) is not None
            for layer in layers
            for name in _PROJECTIONS
        )
    except AttributeError:
        return False


def _base_linear(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain linear layer computing `module`'s base output (peft's LoRA wraps it), or None."""
    if isinstance(module, peft.tuners.lora.Linear):
        module = module.get_base_layer()
    return module if type(module) is torch.nn.Linear else None


class DecodeStep:
    """Decode steps of `decoder` (one token per row), the LoRA updates of each projection by `lora`."""

    def __init__(self, decoder: torch.nn.Module, config, lora: LoraUpdates | None):
        self.embed, self.rotary, self.lora = decoder.embed_tokens, decoder.rotary_emb, lora
        self.final_norm, self.eps = decoder.norm.weight, config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.layers = [self._layer(i, layer) for i, layer in enumerate(decoder.layers[: config.num_hidden_layers])]

    @staticmethod
    def _layer(index: int, layer: torch.nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp

        def projection(module: torch.nn.Module) -> _Projection:
            linear = _base_linear(module)
            return _Projection(module, linear.weight, linear.bias)

        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return _Layer(
            index, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
            *(projection(getattr(attn, name)) for name in _PROJECTIONS[:4]),
            *(projection(getattr(mlp, name)) for name in _PROJECTIONS[4:]),
            None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
        )

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """input_ids, position_ids [R, 1]; attention_mask [R, L] over the cache and the new token.
        Returns the final hidden state [R, D] (after the final norm)."""
        rows = input_ids.shape[0]
        x = self.embed(input_ids)  # [R, 1, D]
        cos, sin = self.rotary(x, position_ids)  # [R, 1, head_dim]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # over the heads of [R, heads, 1, head_dim]
        x = x.view(rows, -1)
        shared = isinstance(cache, prompt_attention.SharedPromptCache)
        # As transformers: no mask when no row has padding (sdpa over all heads, GQA in the kernel),
        # else the rows' mask with each key/value head's queries packed as one query block.
        mask = None if shared or bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            h = self._norm(x, layer.input_norm)
            q = self._project(layer.q, h).view(rows, self.heads, 1, self.head_dim)
            k = self._project(layer.k, h).view(rows, self.kv_heads, 1, self.head_dim)
            v = self._project(layer.v, h).view(rows, self.kv_heads, 1, self.head_dim)
            if layer.q_norm is not None:
                q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            keys, values = cache.update(k, v, layer.index)
            if shared:
                attended = cache.attend(layer.index, q, keys, values, self.scale)
            elif mask is None:
                attended = F.scaled_dot_product_attention(q, keys, values, scale=self.scale, enable_gqa=self.heads != self.kv_heads)
            else:
                packed = q.view(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
                attended = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=self.scale)
            x = x + self._project(layer.o, attended.reshape(rows, -1))
            h = self._norm(x, layer.post_attention_norm)
            x = x + self._project(layer.down, F.silu(self._project(layer.gate, h)) * self._project(layer.up, h))
        return self._norm(x, self.final_norm)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' RMSNorm: normalised in float32, cast back, then scaled."""
        if x.dtype == torch.float32:
            return weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _project(self, projection: _Projection, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, projection.weight, projection.bias)
        if self.lora is not None:
            self.lora.add_update(projection.module, x, out)
        return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

