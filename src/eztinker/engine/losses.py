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
        # Fix: `weights` used to become None for the whole micro-batch as soon as one example had
        # none, so the other examples' weights (e.g. 0.5) were silently replaced by 1 and the loss
        # depended on how examples were batched. An example without weights now gets `default`.
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
