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

# Each loss's loss_fn_config keys and their defaults (Tinker's names; max_weight is EZTinker's).
_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": _CLIP,
    "cispo": _CLIP,
    "dro": {"beta": 0.05},
    "gspo": _CLIP,
    "stable_reinforce": {"max_weight": 2.0},
}


def resolve_config(loss_fn: LossFnName, config: dict[str, float]) -> dict[str, float]:
    """`config` over the loss's defaults; ValueError naming a key the loss does not take."""
    defaults = CONFIG_DEFAULTS[loss_fn]
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) or "none"
        raise ValueError(f"loss_fn_config: {loss_fn} does not take {unknown[0]!r} (it takes: {accepted})")
    resolved = {**defaults, **config}
    if loss_fn == "stable_reinforce" and resolved["max_weight"] <= 0:
        raise ValueError("loss_fn_config: stable_reinforce's max_weight must be positive")
    return resolved


@dataclass
class LossInputs:
    """Per selected position (row-major over the micro-batch), flattened to [N].

    cross_entropy's `targets` and `weights` are [N, K] (K = 1 for one target a position; a datum
    with fewer targets than the micro-batch's widest is padded with weight 0)."""

    targets: torch.Tensor
    weights: torch.Tensor | None
    sampling_logprobs: torch.Tensor | None
    advantages: torch.Tensor | None
    rows: torch.Tensor | None = None  # [N] index of each position's example in the micro-batch
    ratio_mask: torch.Tensor | None = None  # gspo: [N] bool, the positions in the sequence ratio
    sequence_log_ratio: torch.Tensor | None = None  # gspo: [N] its example's mean masked log-ratio


def targets_width(examples: list[Datum]) -> int:
    """The widest K of a micro-batch's examples (1 when each position has one target)."""
    return max((d.loss_fn_inputs.targets_per_position or 1) for d in examples)


def _as_rows(values, k: int) -> torch.Tensor:
    """[n] or [n, k'] values -> [n, k], zero-padded on the right."""
    t = torch.tensor(values, dtype=torch.float64)
    t = t.reshape(len(values), -1)
    if t.shape[1] < k:
        t = torch.nn.functional.pad(t, (0, k - t.shape[1]))
    return t


def select_positions(examples: list[Datum], loss_fn: LossFnName, width: int) -> torch.Tensor:
    """[B, T] mask of the positions whose loss term can be nonzero (gspo: also those in the
    sequence ratio, whose logprobs its ratio needs)."""
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, datum in enumerate(examples):
        inputs = datum.loss_fn_inputs
        n = len(inputs.target_tokens)
        if loss_fn == "cross_entropy":
            if inputs.weights is None:  # every position counts without weights
                mask[b, :n] = True
            else:
                mask[b, :n] = _as_rows(inputs.weights, 1).ne(0).any(dim=1)
            continue
        mask[b, :n] = torch.tensor(inputs.advantages) != 0
        if loss_fn == "gspo":
            mask[b, :n] |= torch.tensor(inputs.sequence_ratio_mask) != 0
    return mask


def padded_targets(examples: list[Datum], width: int, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] target token ids ([B, T, k] given k; 0 past each example's end) and the [B, T]
    mask of real positions."""
    shape = (len(examples), width) if k is None else (len(examples), width, k)
    targets = torch.zeros(shape, dtype=torch.long)
    valid = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, datum in enumerate(examples):
        n = len(datum.loss_fn_inputs.target_tokens)
        if k is None:
            targets[b, :n] = torch.tensor(datum.loss_fn_inputs.target_tokens, dtype=torch.long)
        else:
            targets[b, :n] = _as_rows(datum.loss_fn_inputs.target_tokens, k).long()
        valid[b, :n] = True
    return targets, valid


def gather_inputs(examples: list[Datum], mask: torch.Tensor, loss_fn: LossFnName, device) -> LossInputs:
    def flat(name: str, dtype: torch.dtype) -> torch.Tensor:
        rows = []
        for b, d in enumerate(examples):
            n = len(d.loss_fn_inputs.target_tokens)
            rows.append(torch.tensor(getattr(d.loss_fn_inputs, name), dtype=dtype)[mask[b, :n]])
        return torch.cat(rows).to(device)

    rows = torch.cat([torch.full((int(mask[b].sum()),), b, dtype=torch.long) for b in range(len(examples))])
    if loss_fn == "cross_entropy":
        k = targets_width(examples)
        targets, weights = [], []
        for b, d in enumerate(examples):
            inputs = d.loss_fn_inputs
            n = len(inputs.target_tokens)
            # An example without `weights` gets 1.0 at its (one) target: dropping the other
            # examples' weights would make the loss depend on how examples are batched.
            w = inputs.weights if inputs.weights is not None else [1.0] * n
            targets.append(_as_rows(inputs.target_tokens, k).long()[mask[b, :n]])
            weights.append(_as_rows(w, k).float()[mask[b, :n]])
        return LossInputs(
            targets=torch.cat(targets).to(device),
            weights=torch.cat(weights).to(device),
            sampling_logprobs=None,
            advantages=None,
            rows=rows.to(device),
        )
    return LossInputs(
        targets=flat("target_tokens", torch.long),
        weights=None,
        sampling_logprobs=flat("logprobs", torch.float32),
        advantages=flat("advantages", torch.float32),
        rows=rows.to(device),
        ratio_mask=flat("sequence_ratio_mask", torch.float32).ne(0) if loss_fn == "gspo" else None,
    )


def set_sequence_log_ratios(inputs: LossInputs, logprobs_N: torch.Tensor, num_examples: int) -> None:
    """gspo: each position's example's mean of (logprob - sampler logprob) over the positions its
    sequence_ratio_mask marks (0 for an example that marks none), from logprobs without a graph."""
    # loss_inputs gives gspo all three.
    assert inputs.sampling_logprobs is not None and inputs.ratio_mask is not None and inputs.rows is not None
    log_ratio = (logprobs_N.detach().float() - inputs.sampling_logprobs.float()) * inputs.ratio_mask
    total = torch.zeros(num_examples, device=log_ratio.device).index_add_(0, inputs.rows, log_ratio)
    count = torch.zeros(num_examples, device=log_ratio.device).index_add_(0, inputs.rows, inputs.ratio_mask.float())
    inputs.sequence_log_ratio = (total / count.clamp(min=1))[inputs.rows]


def compute(
    loss_fn: LossFnName, logprobs_N: torch.Tensor, inputs: LossInputs, chunk: slice, config: dict[str, float]
) -> torch.Tensor:
    """The summed loss of a chunk of positions; `config` is `resolve_config`'s (every key set).
    cross_entropy's logprobs are [C, K], the others' [C]."""
    if loss_fn == "cross_entropy":
        assert inputs.weights is not None  # loss_inputs sets them for cross_entropy
        return -(logprobs_N * inputs.weights[chunk]).sum()
    assert inputs.sampling_logprobs is not None and inputs.advantages is not None  # the RL losses' inputs
    sampling_logprobs, advantages = inputs.sampling_logprobs[chunk], inputs.advantages[chunk]
    if loss_fn == "gspo":
        # Every token carries its sequence's ratio as value and its own logprob's gradient (GSPO-token).
        assert inputs.sequence_log_ratio is not None  # set_sequence_log_ratios ran first
        ratio = torch.exp(inputs.sequence_log_ratio[chunk] + logprobs_N - logprobs_N.detach())
        clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
        return -torch.minimum(ratio * advantages, clipped * advantages).sum()
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
    if loss_fn == "stable_reinforce":
        # REINFORCE with a truncated importance weight (docs/tinker.md says why this form).
        weight = ratio.detach().clamp(max=config["max_weight"])
        return -(weight * logprobs_N * advantages).sum()
    if loss_fn == "dro":
        penalty = 0.5 * config["beta"] * (logprobs_N - sampling_logprobs).square()
        return -(logprobs_N * advantages - penalty).sum()
    raise ValueError(f"unknown loss_fn {loss_fn!r}")


def scatter_rows(logprobs_B_T: torch.Tensor, known_B_T: torch.Tensor, examples: list[Datum]) -> list[list]:
    """Back to one list per example ([N] or [N, K] as the example's targets); None where no logit
    was computed. `logprobs_B_T` is [B, T] or [B, T, K]."""
    values, known = logprobs_B_T.tolist(), known_B_T.tolist()
    rows: list[list] = []
    for b, datum in enumerate(examples):
        n = len(datum.loss_fn_inputs.target_tokens)
        k = datum.loss_fn_inputs.targets_per_position
        if logprobs_B_T.dim() == 2:
            rows.append([values[b][t] if known[b][t] else None for t in range(n)])
        elif k is None:
            rows.append([values[b][t][0] if known[b][t] else None for t in range(n)])
        else:
            rows.append([values[b][t][:k] if known[b][t] else [None] * k for t in range(n)])
    return rows


# ------------------------------------------------------------------------ output projection
# Elements of the one [positions, V] float32 buffer the projection reuses chunk after chunk
# (128 MB): no fresh vocabulary-sized tensor per chunk, no autograd graph through the logits.
PROJECTION_BUFFER_ELEMENTS = 1 << 25


def two_d(t: torch.Tensor) -> torch.Tensor:
    """[C] -> [C, 1]; [C, K] as it is."""
    return t.unsqueeze(-1) if t.dim() == 1 else t


class NonFiniteLoss(ValueError):
    """A chunk's loss is NaN or infinite."""


class VocabProjection:
    """Logprobs of target tokens under `hidden @ weight.T (+ bias)`, and the gradient of a loss of
    those logprobs with respect to `hidden`, computed chunk by chunk in one reused buffer.

    The logits' gradient is written by hand: for logprob_t = logit_t - logsumexp(logits),
    d loss / d logits = g * (onehot(t) - softmax(logits)) with g = d loss / d logprob_t, so the
    backward pass costs one more matmul and no extra vocabulary-sized tensors.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, chunk_rows: int, packed: PackedWeight | None = None
    ):
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
        """Target logprobs [C] (or [C, K] for targets [C, K]), the buffer holding exp(logits - max)
        with its row sums, and with topk > 0 the k largest logprobs [C, k] and their token ids [C, k]
        (else None)."""
        logits = self._logits(hidden_C_H)
        logits.sub_(logits.amax(dim=-1, keepdim=True))
        target_logits = logits.gather(-1, two_d(targets_C)).reshape(targets_C.shape)
        top = logits.topk(topk, dim=-1) if topk else None  # before exp_ overwrites the logits
        exp = logits.exp_()
        sums = exp.sum(dim=-1)
        log_sums = sums.log()
        top_logprobs = None if top is None else (top.values - log_sums.unsqueeze(-1), top.indices)
        return target_logits - log_sums.reshape(-1, *([1] * (targets_C.dim() - 1))), exp, sums, top_logprobs

    def _hidden_grad(self, grad_logits_C_V: torch.Tensor, hidden_C_H: torch.Tensor) -> torch.Tensor:
        """d loss / d hidden of a chunk, from d loss / d logits (head_lora.py adds its LoRA's part)."""
        return torch.mm(grad_logits_C_V.to(self.weight.dtype), self.weight).to(hidden_C_H.dtype)

    @torch.no_grad()
    def logprobs(self, hidden_N_H: torch.Tensor, targets_N: torch.Tensor, topk: int = 0):
        """Target logprobs [N] (or [N, K]), the k largest logprobs [N, k] and their token ids [N, k] (k may be 0)."""
        n = hidden_N_H.shape[0]
        out = torch.empty(targets_N.shape, device=hidden_N_H.device)
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
        the logprobs [N] (or [N, K] for targets [N, K]) and d(summed loss)/d hidden [N, H].
        Raises NonFiniteLoss."""
        hidden_N_H = hidden_N_H.detach()
        grad_N_H = torch.empty_like(hidden_N_H)
        logprobs_N = torch.empty(targets_N.shape, device=hidden_N_H.device)
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
                # d loss / d logits = -(sum of g) * softmax + g at each target, in place in the buffer.
                g_C_K = two_d(g)
                grad_logits = exp.mul_((-g_C_K.sum(dim=-1) / sums).unsqueeze(-1))
                grad_logits.scatter_add_(-1, two_d(targets), g_C_K.to(grad_logits.dtype))
                grad_N_H[chunk] = self._hidden_grad(grad_logits, hidden_N_H[chunk])
            total += loss.item()
            logprobs_N[chunk] = token_logprobs.detach()
        return total, logprobs_N, grad_N_H
