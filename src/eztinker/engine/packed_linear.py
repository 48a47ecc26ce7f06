"""Linear layers over frozen base weights through oneDNN, each weight packed once into its blocked layout.

On CPU torch's float32 matmul is MKL's. On a 2-core AVX2 EPYC it ran a small decoder's shapes
below oneDNN's speed with the weight prepacked (`python bench/packed_linear.py`, cache-warm): at 4
rows (a decode step of 4 candidates) SmolLM2's q/o, gate/up and down projections 1.6-2.1x slower,
its output head 3.3x (k/v, 192 x 576: 0.7x); at 128-1024 rows the projections 0.9-1.3x, the head
1.5-2.2x. Whole calls (`bench/plain_decoder.py`): forward 1 x 8 1.44x, sampling 1 x 4 x 16 1.37x,
forward_backward 4 x 32 1.12x. A packed weight costs the weight's memory once more, so the engine
packs only what its own forward computes (`PlainDecoder`'s projections and the output head), once:
base weights never change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] packed for oneDNN, or None where that does not apply (not a float32 CPU
    tensor, a torch without oneDNN) or does not reproduce `F.linear` on a probe."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        if not torch.allclose(_forward(probe, packed, None), F.linear(probe, weight.detach()), rtol=1e-4, atol=1e-5):
            return None
    except (AttributeError, RuntimeError):  # the op is missing or refuses this weight
        return None
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), by the packed weight where there is one (differentiable in x)."""
    if packed is None or weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(x, weight, bias)
    if x.requires_grad and torch.is_grad_enabled():
        return _PackedLinear.apply(x, weight, bias, packed)
    return _forward(x, packed, bias)


def _forward(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _PackedLinear(torch.autograd.Function):
    """The forward by oneDNN; the input's gradient grad @ weight by the plain weight (the weights
    are frozen: no gradient of their own)."""

    @staticmethod
    def forward(ctx, x, weight, bias, packed):
        ctx.save_for_backward(weight)
        return _forward(x, packed, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None, None
