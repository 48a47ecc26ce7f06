"""Loss functions over the positions that carry loss.

Only positions with a nonzero weight (cross_entropy) or advantage (importance_sampling, ppo) are
projected to the vocabulary: with a 152k-token vocabulary the output projection of every position
would dominate a small model's step. Losses are sums, so gradient accumulation over several
`forward_backward` calls equals one call on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..types import Datum, LossFnName

PPO_CLIP = 0.2


@dataclass
class LossInputs:
    """Per selected position (row-major over the micro-batch), flattened to [N]."""

    targets: torch.Tensor
    weights: torch.Tensor | None
    sampling_logprobs: torch.Tensor | None
    advantages: torch.Tensor | None


def _per_token_key(loss_fn: LossFnName) -> str:
    return "weights" if loss_fn == "cross_entropy" else "advantages"


def select_positions(examples: list[Datum], loss_fn: LossFnName, width: int) -> torch.Tensor:
    """[B, T] mask of the positions whose loss term can be nonzero."""
    key = _per_token_key(loss_fn)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, datum in enumerate(examples):
        values = getattr(datum.loss_fn_inputs, key)
        if values is None:  # cross_entropy without weights: every position counts
            mask[b, : len(datum.loss_fn_inputs.target_tokens)] = True
        else:
            mask[b, : len(values)] = torch.tensor(values) != 0
    return mask


def gather_inputs(examples: list[Datum], mask: torch.Tensor, loss_fn: LossFnName, device) -> LossInputs:
    def flat(name: str, dtype: torch.dtype, default: float | None = None) -> torch.Tensor | None:
        # An example without `weights` gets `default` (1.0): returning None for the whole micro-batch
        # would silently replace the other examples' weights (e.g. 0.5) by 1, making the loss depend
        # on how examples are batched.
        rows = []
        for b, d in enumerate(examples):
            values = getattr(d.loss_fn_inputs, name)
            n = len(d.loss_fn_inputs.target_tokens)
            if values is None:
                if default is None:
                    return None
                values = [default] * n
            rows.append(torch.tensor(values, dtype=dtype)[mask[b, :n]])
        return torch.cat(rows).to(device)

    is_rl = loss_fn != "cross_entropy"
    return LossInputs(
        targets=flat("target_tokens", torch.long),
        weights=None if is_rl else flat("weights", torch.float32, default=1.0),
        sampling_logprobs=flat("logprobs", torch.float32) if is_rl else None,
        advantages=flat("advantages", torch.float32) if is_rl else None,
    )


def compute(loss_fn: LossFnName, logprobs_N: torch.Tensor, inputs: LossInputs, chunk: slice) -> torch.Tensor:
    if loss_fn == "cross_entropy":
        weights = inputs.weights[chunk] if inputs.weights is not None else torch.ones_like(logprobs_N)
        return -(logprobs_N * weights).sum()
    ratio = torch.exp(logprobs_N - inputs.sampling_logprobs[chunk])
    advantages = inputs.advantages[chunk]
    if loss_fn == "importance_sampling":
        return -(ratio * advantages).sum()
    if loss_fn == "ppo":
        clipped = ratio.clamp(1 - PPO_CLIP, 1 + PPO_CLIP)
        return -torch.minimum(ratio * advantages, clipped * advantages).sum()
    raise ValueError(f"unknown loss_fn {loss_fn!r}")


def scatter_rows(logprobs_N: torch.Tensor, mask: torch.Tensor, examples: list[Datum]) -> list[list[float | None]]:
    """Back to one list per example; None where no logit was computed."""
    rows: list[list[float | None]] = []
    values = iter(logprobs_N.tolist())
    for b, datum in enumerate(examples):
        n = len(datum.loss_fn_inputs.target_tokens)
        rows.append([next(values) if mask[b, t] else None for t in range(n)])
    return rows


# ------------------------------------------------------------------------ output projection
# Elements of the one [positions, V] float32 buffer the projection reuses chunk after chunk
# (128 MB): no fresh vocabulary-sized tensor per chunk, no autograd graph through the logits.
PROJECTION_BUFFER_ELEMENTS = 1 << 25


class NonFiniteLoss(ValueError):
    """A chunk's loss is NaN or infinite."""


class VocabProjection:
    """Logprobs of target tokens under `hidden @ weight.T (+ bias)`, and the gradient of a loss of
    those logprobs with respect to `hidden`, computed chunk by chunk in one reused buffer.

    The logits' gradient is written by hand: for logprob_t = logit_t - logsumexp(logits),
    d loss / d logits = g * (onehot(t) - softmax(logits)) with g = d loss / d logprob_t, so the
    backward pass costs one more matmul and no extra vocabulary-sized tensors.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, chunk_rows: int):
        self.weight, self.bias = weight, bias
        vocab = weight.shape[0]
        self.chunk_rows = max(1, min(chunk_rows, PROJECTION_BUFFER_ELEMENTS // vocab))
        self._buffer: torch.Tensor | None = None

    def _logits(self, hidden_C_H: torch.Tensor) -> torch.Tensor:
        rows = hidden_C_H.shape[0]
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = torch.empty(self.chunk_rows, self.weight.shape[0], device=self.weight.device)
        out = self._buffer[:rows]
        if self.weight.dtype != out.dtype:
            out.copy_(torch.nn.functional.linear(hidden_C_H.to(self.weight.dtype), self.weight, self.bias))
        elif self.bias is None:
            torch.mm(hidden_C_H, self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, hidden_C_H, self.weight.t(), out=out)
        return out

    def _logprobs_and_exp(self, hidden_C_H: torch.Tensor, targets_C: torch.Tensor):
        """Target logprobs [C], and the buffer holding exp(logits - max) with its row sums."""
        logits = self._logits(hidden_C_H)
        logits.sub_(logits.amax(dim=-1, keepdim=True))
        target_logits = logits.gather(-1, targets_C.unsqueeze(-1)).squeeze(-1)
        exp = logits.exp_()
        sums = exp.sum(dim=-1)
        return target_logits - sums.log(), exp, sums

    @torch.no_grad()
    def logprobs(self, hidden_N_H: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        out = torch.empty(hidden_N_H.shape[0], device=hidden_N_H.device)
        for start in range(0, hidden_N_H.shape[0], self.chunk_rows):
            chunk = slice(start, start + self.chunk_rows)
            out[chunk] = self._logprobs_and_exp(hidden_N_H[chunk], targets_N[chunk])[0]
        return out

    def logprobs_and_grad(self, hidden_N_H: torch.Tensor, targets_N: torch.Tensor, chunk_loss):
        """`chunk_loss(logprobs_C, chunk) -> scalar` for each chunk; returns the summed loss (a float),
        the logprobs [N] and d(summed loss)/d hidden [N, H]. Raises NonFiniteLoss."""
        hidden_N_H = hidden_N_H.detach()
        grad_N_H = torch.empty_like(hidden_N_H)
        logprobs_N = torch.empty(hidden_N_H.shape[0], device=hidden_N_H.device)
        total = 0.0
        for start in range(0, hidden_N_H.shape[0], self.chunk_rows):
            chunk = slice(start, start + self.chunk_rows)
            targets = targets_N[chunk]
            with torch.no_grad():
                token_logprobs, exp, sums = self._logprobs_and_exp(hidden_N_H[chunk], targets)
            token_logprobs.requires_grad_(True)
            loss = chunk_loss(token_logprobs, chunk)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss is not finite ({loss.item()})")
            (g,) = torch.autograd.grad(loss, token_logprobs)
            with torch.no_grad():
                # d loss / d logits = -g * softmax + g at the target, in place in the buffer.
                grad_logits = exp.mul_((-g / sums).unsqueeze(-1))
                grad_logits.scatter_add_(-1, targets.unsqueeze(-1), g.unsqueeze(-1))
                grad_N_H[chunk] = torch.mm(grad_logits.to(self.weight.dtype), self.weight).to(grad_N_H.dtype)
            total += loss.item()
            logprobs_N[chunk] = token_logprobs.detach()
        return total, logprobs_N, grad_N_H
