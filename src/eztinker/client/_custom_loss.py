"""`forward_backward_custom`: any differentiable loss of the per-token logprobs, trained with
the server's own `cross_entropy`.

The server's cross_entropy is L = -sum_t w_t * logprob_t with signed float weights, so its
gradient with respect to each logprob is -w_t. A custom loss C(logprobs) is differentiated here,
on the client, with torch autograd; sending w_t = -dC/dlogprob_t makes the server's gradient of
the adapter exactly C's (the chain rule through the same logprobs). This is what the Tinker SDK
does; torch is needed only on this side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..types import Datum, LossFnInputs

# loss_fn(data, logprobs) -> (loss, metrics): `logprobs` holds one 1-D tensor per datum (the
# logprob of each target token, requiring grad); `loss` is a scalar tensor.
CustomLossFn = Callable[[Sequence[Datum], list[Any]], tuple[Any, dict[str, float]]]


@dataclass
class CustomLossResult:
    """What `forward_backward_custom` returns: the custom loss, its metrics, and the forward's logprobs."""

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    logprobs: list[list[float]] = field(default_factory=list)
    num_tokens: int = 0  # positions whose gradient was nonzero (the server computed logits there)


def linearise(data: Sequence[Datum], logprobs: list[list[float | None]], loss_fn: CustomLossFn):
    """The custom loss on `logprobs` (the forward's, every position known) and the datums whose
    cross_entropy weights carry its gradient; returns (loss, metrics, weighted datums)."""
    import torch

    if len(logprobs) != len(data):
        raise ValueError(f"the forward returned {len(logprobs)} rows for {len(data)} datums")
    tensors = []
    for i, row in enumerate(logprobs):
        if any(v is None for v in row):
            raise ValueError(f"the forward left logprobs of datum {i} unknown; every position's is needed")
        tensors.append(torch.tensor(row, dtype=torch.float32, requires_grad=True))
    loss, metrics = loss_fn(data, tensors)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("loss_fn must return (a scalar torch tensor, a dict of metrics)")
    loss.backward()
    weighted = []
    for datum, tensor in zip(data, tensors):
        grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        if not bool(torch.isfinite(grad).all()):
            raise ValueError("the custom loss has a non-finite gradient; nothing was sent to the server")
        inputs = LossFnInputs(target_tokens=datum.loss_fn_inputs.target_tokens, weights=(-grad).tolist())
        weighted.append(Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
    return float(loss.detach()), {k: float(v) for k, v in metrics.items()}, weighted
