"""Loss functions over the positions that carry loss.

Only positions with a nonzero weight (cross_entropy) or advantage (the RL losses) are projected to
the vocabulary: with a 152k-token vocabulary the output projection of every position would dominate
a small model's step. Losses are sums, so gradient accumulation over several `forward_backward`
calls equals one call on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..types import Datum, LossFnName
from .output_projection import logits_into
from .packed_linear import PackedWeight

# Each loss's loss_fn_config keys and their defaults (Tinker's names).
_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": _CLIP,
    "cispo": _CLIP,
    "dro": {"beta": 0.05},
}


def resolve_config(loss_fn: LossFnName, config: dict[str, float]) -> dict[str, float]:
    """`config` over the loss's defaults; ValueError naming a key the loss does not take."""
    defaults = CONFIG_DEFAULTS[loss_fn]
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) or "none"
        raise ValueError(f"loss_fn_config: {loss_fn} does not take {unknown[0]!r} (it takes: {accepted})")
    return {**defaults, **config}


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


def padded_targets(examples: list[Datum], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] target token ids (0 past each example's end) and the [B, T] mask of real positions."""
    targets = torch.zeros((len(examples), width), dtype=torch.long)
    valid = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, datum in enumerate(examples):
        n = len(datum.loss_fn_inputs.target_tokens)
        targets[b, :n] = torch.tensor(datum.loss_fn_inputs.target_tokens, dtype=torch.long)
        valid[b, :n] = True
    return targets, valid


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


def compute(
    loss_fn: LossFnName, logprobs_N: torch.Tensor, inputs: LossInputs, chunk: slice, config: dict[str, float]
) -> torch.Tensor:
    """The summed loss of a chunk of positions; `config` is `resolve_config`'s (every key set)."""
    if loss_fn == "cross_entropy":
        weights = inputs.weights[chunk] if inputs.weights is not None else torch.ones_like(logprobs_N)
        return -(logprobs_N * weights).sum()
    sampling_logprobs, advantages = inputs.sampling_logprobs[chunk], inputs.advantages[chunk]
    ratio = torch.exp(logprobs_N - sampling_logprobs)
    if loss_fn == "importance_sampling":
        return -(ratio * advantages).sum()
    if loss_fn == "ppo":
        clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
        return -torch.minimum(ratio * advantages, clipped * advantages).sum()
    if loss_fn == "cispo":
        # The clipped ratio only weighs each token's policy gradient; no gradient flows through it.
        weight = ratio.detach().clamp(config["clip_low_threshold"], config["clip_high_threshold"])
        return -(weight * logprobs_N * advantages).sum()
    if loss_fn == "dro":
        penalty = 0.5 * config["beta"] * (logprobs_N - sampling_logprobs).square()
        return -(logprobs_N * advantages - penalty).sum()
    raise ValueError(f"unknown loss_fn {loss_fn!r}")


def scatter_rows(logprobs_B_T: torch.Tensor, known_B_T: torch.Tensor, examples: list[Datum]) -> list[list[float | None]]:
    """Back to one list per example; None where no logit was computed."""
    values, known = logprobs_B_T.tolist(), known_B_T.tolist()
    rows: list[list[float | None]] = []
    for b, datum in enumerate(examples):
        n = len(datum.loss_fn_inputs.target_tokens)
        rows.append([values[b][t] if known[b][t] else None for t in range(n)])
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

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, chunk_rows: int, packed: PackedWeight | None = None):
        self.weight, self.bias, self.packed = weight, bias, packed  # packed: for oneDNN (packed_linear.py)
        vocab = weight.shape[0]
        self.chunk_rows = max(1, min(chunk_rows, PROJECTION_BUFFER_ELEMENTS // vocab))
        self._buffer: torch.Tensor | None = None

    def _logits(self, hidden_C_H: torch.Tensor) -> torch.Tensor:
        rows = hidden_C_H.shape[0]
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = torch.empty(self.chunk_rows, self.weight.shape[0], device=self.weight.device)
        return logits_into(self._buffer[:rows], hidden_C_H, self.weight, self.bias, self.packed)

    def _logprobs_and_exp(self, hidden_C_H: torch.Tensor, targets_C: torch.Tensor, topk: int = 0):
        """Target logprobs [C], the buffer holding exp(logits - max) with its row sums, and with
        topk > 0 the k largest logprobs [C, k] and their token ids [C, k] (else None)."""
        logits = self._logits(hidden_C_H)
        logits.sub_(logits.amax(dim=-1, keepdim=True))
        target_logits = logits.gather(-1, targets_C.unsqueeze(-1)).squeeze(-1)
        top = logits.topk(topk, dim=-1) if topk else None  # before exp_ overwrites the logits
        exp = logits.exp_()
        sums = exp.sum(dim=-1)
        log_sums = sums.log()
        if top is not None:
            top = (top.values - log_sums.unsqueeze(-1), top.indices)
        return target_logits - log_sums, exp, sums, top

    def _hidden_grad(self, grad_logits_C_V: torch.Tensor, hidden_C_H: torch.Tensor) -> torch.Tensor:
        """d loss / d hidden of a chunk, from d loss / d logits (head_lora.py adds its LoRA's part)."""
        return torch.mm(grad_logits_C_V.to(self.weight.dtype), self.weight).to(hidden_C_H.dtype)

    @torch.no_grad()
    def logprobs(self, hidden_N_H: torch.Tensor, targets_N: torch.Tensor, topk: int = 0):
        """Target logprobs [N], the k largest logprobs [N, k] and their token ids [N, k] (k may be 0)."""
        n = hidden_N_H.shape[0]
        out = torch.empty(n, device=hidden_N_H.device)
        top_N_K = torch.empty(n, topk, device=hidden_N_H.device)
        ids_N_K = torch.empty(n, topk, dtype=torch.long, device=hidden_N_H.device)
        for start in range(0, n, self.chunk_rows):
            chunk = slice(start, start + self.chunk_rows)
            out[chunk], _, _, top = self._logprobs_and_exp(hidden_N_H[chunk], targets_N[chunk], topk)
            if top is not None:
                top_N_K[chunk], ids_N_K[chunk] = top
        return out, top_N_K, ids_N_K

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
                token_logprobs, exp, sums, _ = self._logprobs_and_exp(hidden_N_H[chunk], targets)
            token_logprobs.requires_grad_(True)
            loss = chunk_loss(token_logprobs, chunk)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss is not finite ({loss.item()})")
            (g,) = torch.autograd.grad(loss, token_logprobs)
            with torch.no_grad():
                # d loss / d logits = -g * softmax + g at the target, in place in the buffer.
                grad_logits = exp.mul_((-g / sums).unsqueeze(-1))
                grad_logits.scatter_add_(-1, targets.unsqueeze(-1), g.unsqueeze(-1))
                grad_N_H[chunk] = self._hidden_grad(grad_logits, hidden_N_H[chunk])
            total += loss.item()
            logprobs_N[chunk] = token_logprobs.detach()
        return total, logprobs_N, grad_N_H
