"""A LoRA on the output head (Tinker's `train_unembed`): its term of the logits, and the training
projection's gradient with it.

peft wraps the head (lm_head) in a LoRA layer like any other linear layer, so checkpoints are plain
peft adapters. But the engine computes logits itself, from the head's base weight (the training
projection in losses.py, the sampler's head, the scoring path), never through peft's wrapper; each
of those adds the adapter's term here:

    logits = hidden @ W.T (+ bias) + scaling * (dropout(hidden) @ A.T) @ B.T

Where the head shares its weight with the input embeddings (tied, as in Qwen2-0.5B and SmolLM2), the
LoRA changes only the output side: the weight itself is never written, so the embeddings are as loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import peft
import torch
from torch import nn

from .losses import VocabProjection


@dataclass(frozen=True)
class HeadLora:
    """One adapter's LoRA on the output head."""

    a: torch.Tensor  # [r, D]: lora_A's weight
    b: torch.Tensor  # [V, r]: lora_B's weight
    scaling: float
    dropout: nn.Module

    @classmethod
    def of(cls, layer: nn.Module | peft.tuners.lora.LoraLayer | None, adapter: str | None) -> HeadLora | None:
        """`adapter`'s LoRA on `layer` (the head's peft LoRA layer, or None), if it has one."""
        if adapter is None or not isinstance(layer, peft.tuners.lora.LoraLayer) or adapter not in layer.lora_A:
            return None
        return cls(
            cast(torch.Tensor, layer.lora_A[adapter].weight),  # lora_A/B hold nn.Linears
            cast(torch.Tensor, layer.lora_B[adapter].weight),
            layer.scaling[adapter],
            layer.lora_dropout[adapter],
        )

    def down(self, hidden_N_D: torch.Tensor) -> torch.Tensor:
        """scaling * dropout(hidden) @ A.T, [N, r] (differentiable)."""
        return (self.dropout(hidden_N_D).to(self.a.dtype) @ self.a.t()) * self.scaling

    def add_to(self, logits_N_V: torch.Tensor, down_N_R: torch.Tensor) -> torch.Tensor:
        """logits += down @ B.T, in place."""
        return logits_N_V.addmm_(down_N_R.to(logits_N_V.dtype), self.b.t().to(logits_N_V.dtype))

    def logits(self, base_logits_N_V: torch.Tensor, hidden_N_D: torch.Tensor) -> torch.Tensor:
        """base logits + the LoRA's term, out of place (for autograd)."""
        return base_logits_N_V + (self.down(hidden_N_D) @ self.b.t()).to(base_logits_N_V.dtype)


def features(hidden_N_D: torch.Tensor, lora: HeadLora) -> torch.Tensor:
    """What `HeadLoraProjection` projects: [hidden, lora.down(hidden)], [N, D + r], in float32."""
    return torch.cat([hidden_N_D.float(), lora.down(hidden_N_D).float()], dim=1)


class HeadLoraProjection(VocabProjection):
    """`VocabProjection` of `features(hidden, lora)`: the base head's logits plus the LoRA's term.

    The LoRA's down-projection is part of the projected features, so the gradient that
    `logprobs_and_grad` returns (with respect to the features) carries both hidden's and the
    down-projection's, and autograd takes it on to A and the decoder. B's gradient,
    d loss / d B = (d loss / d logits).T @ down, is accumulated into B's .grad here, chunk by chunk,
    as autograd would."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, chunk_rows: int, packed, lora: HeadLora):
        super().__init__(weight, bias, chunk_rows, packed)
        self.lora = lora

    def _logits(self, hidden_C_H: torch.Tensor) -> torch.Tensor:
        width = self.weight.shape[1]
        logits = super()._logits(hidden_C_H[:, :width].contiguous())
        return self.lora.add_to(logits, hidden_C_H[:, width:])

    def _hidden_grad(self, grad_logits_C_V: torch.Tensor, hidden_C_H: torch.Tensor) -> torch.Tensor:
        width, b = self.weight.shape[1], self.lora.b
        down_C_R = hidden_C_H[:, width:]
        if b.requires_grad:
            grad_b = torch.mm(grad_logits_C_V.t(), down_C_R.to(grad_logits_C_V.dtype)).to(b.dtype)
            b.grad = grad_b if b.grad is None else b.grad.add_(grad_b)
        to_hidden = super()._hidden_grad(grad_logits_C_V, hidden_C_H[:, :width])
        to_down = torch.mm(grad_logits_C_V, b.to(grad_logits_C_V.dtype))
        return torch.cat([to_hidden.to(hidden_C_H.dtype), to_down.to(hidden_C_H.dtype)], dim=1)
