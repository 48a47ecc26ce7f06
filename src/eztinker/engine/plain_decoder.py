"""A llama-family decoder's forward as plain tensor operations, for the sampler's decode steps
and for training and scoring forwards over whole sequences.

Through transformers' and peft's modules more than half of a small decode step's time was Python
around the matmuls (module calls, hooks and decorators, a causal mask built every step, peft's
per-layer adapter bookkeeping; docs/performance.md, "Engine figures"). For the models
`prompt_attention` already reads exactly (llama, qwen2, qwen3: SiLU MLP, sdpa, full causal
attention), `PlainDecoder` computes the same forward from the same parameters with nothing between
the operations: per layer RMSNorm, q/k/v projections plus the LoRA updates (`LoraUpdates`: the
sampler's stacked adapters, or one training run's, differentiable), RoPE, attention, o_proj, MLP.
  * `decode`: one new token a row over a KV cache: sdpa over the row's cache (packed per key/value
    head as transformers does for one query), or the shared prompt cache's two-part attention.
  * `causal`: whole right-padded sequences from position 0, no cache (training, scoring): causal
    sdpa. Padding at the end changes no real position's output (causality), so no mask is needed.
  * `prefill`: the sampler's prompts, left-padded, after a cached shared prefix (or none): sdpa
    with the rows' causal padding mask, writing the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import peft
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import packed_linear, prompt_attention

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraUpdates(Protocol):
    """Adds the LoRA updates of `module` for its input `x` [..., in] to its base output `out` [..., out] (in place)."""

    def add_update(self, module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class _Projection:
    module: torch.nn.Module  # the model's own (peft-wrapped or plain) linear, the key of its LoRA update
    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: packed_linear.PackedWeight | None  # the weight packed for oneDNN (packed_linear.py), or None


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
    """Whether `decoder` (the model's base, e.g. LlamaModel) is the structure `PlainDecoder` computes."""
    if (
        not prompt_attention.supports(config)
        or config.hidden_act != "silu"
        or getattr(config, "attention_dropout", 0.0)
    ):
        return False
    try:
        layers = cast(torch.nn.ModuleList, decoder.layers)[: config.num_hidden_layers]
        return type(decoder.embed_tokens) is torch.nn.Embedding and all(
            _base_linear(getattr(layer.self_attn if name in _PROJECTIONS[:4] else layer.mlp, name)) is not None
            for layer in layers
            for name in _PROJECTIONS
        )
    except AttributeError:
        return False


def _weight(module: object) -> torch.Tensor:
    """A norm's weight: transformers' submodules are typed as nn.Module attributes (Tensor | Module)."""
    return cast(Any, module).weight


def _base_linear(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain linear layer computing `module`'s base output (peft's LoRA wraps it), or None."""
    if isinstance(module, peft.tuners.lora.Linear):
        module = module.get_base_layer()
    return module if type(module) is torch.nn.Linear else None


class PlainDecoder:
    """Forwards of `decoder` (the model's base module), each with the LoRA updates of a `lora`
    (None: the bare model). Holds the decoder's parameters, not copies: valid until peft wraps or
    unwraps its projections (adapters added to or removed from the model). `pack(weight)`: a
    projection weight's packed copy for oneDNN, or None to multiply by the weight itself."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        config,
        pack: Callable[[torch.Tensor], packed_linear.PackedWeight | None] = lambda w: None,
    ):
        self.embed, self.rotary = cast(torch.nn.Module, decoder.embed_tokens), cast(torch.nn.Module, decoder.rotary_emb)
        self.final_norm, self.eps = _weight(decoder.norm), config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.layers = [
            self._layer(i, layer, pack)
            for i, layer in enumerate(cast(torch.nn.ModuleList, decoder.layers)[: config.num_hidden_layers])
        ]

    @staticmethod
    def _layer(index: int, layer: torch.nn.Module, pack) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp

        def projection(module: torch.nn.Module) -> _Projection:
            linear = _base_linear(module)
            assert linear is not None  # `supports` checked every projection
            return _Projection(module, linear.weight, linear.bias, pack(linear.weight))

        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        q, k, v, o = (projection(getattr(attn, name)) for name in _PROJECTIONS[:4])
        gate, up, down = (projection(getattr(mlp, name)) for name in _PROJECTIONS[4:])
        return _Layer(
            index,
            _weight(layer.input_layernorm),
            _weight(layer.post_attention_layernorm),
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
            None if q_norm is None else q_norm.weight,
            None if k_norm is None else k_norm.weight,
        )

    @torch.no_grad()
    def decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        lora: LoraUpdates | None,
    ) -> torch.Tensor:
        """input_ids, position_ids [R, 1]; attention_mask [R, L] over the cache and the new token.
        Returns the final hidden state [R, D] (after the final norm)."""
        rows = input_ids.shape[0]
        if isinstance(cache, prompt_attention.SharedPromptCache):

            def attend(index, q, k, v):
                keys, values = cache.update(k, v, index)
                return cache.attend(index, q, keys, values, self.scale).reshape(rows, -1)
        elif bool(attention_mask.all()):  # as transformers: no mask, sdpa over all heads, GQA in the kernel

            def attend(index, q, k, v):
                keys, values = cache.update(k, v, index)
                out = F.scaled_dot_product_attention(
                    q, keys, values, scale=self.scale, enable_gqa=self.heads != self.kv_heads
                )
                return out.transpose(1, 2).reshape(rows, -1)
        else:  # padding: the rows' mask, each key/value head's queries packed as one query block
            mask = attention_mask.bool()[:, None, None, :]

            def attend(index, q, k, v):
                keys, values = cache.update(k, v, index)
                packed = q.reshape(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
                return F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=self.scale).reshape(
                    rows, -1
                )

        return self._forward(input_ids, position_ids, attend, lora)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        lora: LoraUpdates | None,
    ) -> torch.Tensor:
        """The sampler's prefill: input_ids, position_ids [R, T], left-padded, after the L - T
        positions already in `cache` (a shared prefix, or none); attention_mask [R, L] over all
        of them. Writes these positions' keys and values into the cache and returns the last
        position's final hidden state [R, D]."""
        rows, width = input_ids.shape
        past = attention_mask.shape[1] - width
        if past == 0 and bool(attention_mask.all()):
            mask, causal = None, True
        else:
            # Query t (at cache position past + t) sees the unpadded positions up to its own, and
            # itself in any case: for a padding query that sees no key, torch 2.13's sdpa gives
            # zeros, but older kernels (torch 2.4's math one) give NaNs, which masked keys spread.
            mask = torch.ones(width, past + width, dtype=torch.bool, device=input_ids.device).tril(past)
            mask = mask & attention_mask.bool()[:, None, None, :]
            mask[..., torch.arange(width), past + torch.arange(width)] = True
            causal = False

        def attend(index, q, k, v):
            keys, values = cache.update(k, v, index)
            out = F.scaled_dot_product_attention(
                q,
                keys,
                values,
                attn_mask=mask,
                is_causal=causal,
                scale=self.scale,
                enable_gqa=self.heads != self.kv_heads,
            )
            return out.transpose(1, 2).reshape(rows * width, -1)

        return self._forward(input_ids, position_ids, attend, lora).view(rows, width, -1)[:, -1]

    def causal(self, input_ids: torch.Tensor, lora: LoraUpdates | None, checkpoint: bool = False) -> torch.Tensor:
        """input_ids [B, T], right-padded, from position 0. Returns the final hidden states [B, T, D].
        `checkpoint`: activation checkpointing, where a graph is built: each layer keeps only its
        input for the backward pass and recomputes the rest there (one layer's activations alive
        at a time instead of all of them, for about a third more compute)."""
        batch, width = input_ids.shape

        def attend(index, q, k, v):
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.heads != self.kv_heads
            )
            return out.transpose(1, 2).reshape(batch * width, -1)

        positions = torch.arange(width, device=input_ids.device).expand(batch, width)
        return self._forward(input_ids, positions, attend, lora, checkpoint).view(batch, width, -1)

    def _forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attend,
        lora: LoraUpdates | None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """The final hidden states [B * T, D]. Positions stay flattened between the attentions, so
        every projection's output is a plain 2-D tensor its LoRA update is added to in place (an
        in-place add into a view would cost autograd a copy of it)."""
        batch, width = input_ids.shape
        x = self.embed(input_ids)  # [B, T, D]
        cos, sin = self.rotary(x, position_ids)  # [B, T, head_dim]
        x = x.view(batch * width, -1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # over the heads of [B, heads, T, head_dim]
        checkpoint = checkpoint and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpoint:  # non-reentrant: the LoRA parameters get their gradients; dropout's RNG is replayed
                x = torch.utils.checkpoint.checkpoint(
                    self._block, layer, x, cos, sin, attend, lora, batch, width, use_reentrant=False
                )
            else:
                x = self._block(layer, x, cos, sin, attend, lora, batch, width)
        return self._norm(x, self.final_norm)

    def _block(
        self,
        layer: _Layer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend,
        lora: LoraUpdates | None,
        batch: int,
        width: int,
    ) -> torch.Tensor:
        """One decoder layer on the flattened positions x [B * T, D]."""
        h = self._norm(x, layer.input_norm)
        q = self._project(layer.q, h, lora).view(batch, width, self.heads, self.head_dim)
        k = self._project(layer.k, h, lora).view(batch, width, self.kv_heads, self.head_dim)
        v = self._project(layer.v, h, lora).view(batch, width, self.kv_heads, self.head_dim)
        if layer.q_norm is not None:
            assert layer.k_norm is not None  # qwen3 norms both or neither
            q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        x = x + self._project(layer.o, attend(layer.index, q, k, v), lora)
        h = self._norm(x, layer.post_attention_norm)
        return x + self._project(
            layer.down, F.silu(self._project(layer.gate, h, lora)) * self._project(layer.up, h, lora), lora
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' RMSNorm: normalised in float32, cast back, then scaled."""
        if x.dtype == torch.float32:
            return weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        if x.requires_grad and torch.is_grad_enabled():
            return weight * _LowPrecisionRmsNorm.apply(x, self.eps)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    @staticmethod
    def _project(projection: _Projection, x: torch.Tensor, lora: LoraUpdates | None) -> torch.Tensor:
        out = packed_linear.linear(x, projection.weight, projection.bias, projection.packed)
        if lora is not None:
            lora.add_update(projection.module, x, out)
        return out


class _LowPrecisionRmsNorm(torch.autograd.Function):
    """rms_norm(x.float()).to(x.dtype) for a bf16/fp16 x, keeping x itself for the backward pass:
    autograd would keep the float32 copy (twice the bytes of every norm's input, two a layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.eps = eps
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (saved,) = ctx.saved_tensors  # once: checkpointing's recomputed tensors may be unpacked only once
        x = saved.float()
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)
        normed, grad = x * rstd, grad.float()
        return (rstd * (grad - normed * (grad * normed).mean(-1, keepdim=True))).to(saved.dtype), None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
