"""Linear layers over frozen base weights through oneDNN, each weight packed once into its blocked
layout, for the input sizes where that measured faster than MKL on this machine.

On CPU torch's float32 matmul is MKL's. Which library is faster depends on the CPU, the weight's
shape and the number of rows: on an AVX2 EPYC the packed copy won nearly everywhere, on an
AVX-512 Xeon MKL's GEMV won at one row and the packed head won at a few (docs/performance.md,
"Engine figures"; `python bench/packed_linear.py`).
So `pack` times both on each weight shape, once per process, at one row, a few and many, and the
packed copy serves only the sizes where it won; a weight for which it won at none is not packed.
(An output head is timed against its own alternative, MKL in column blocks: output_projection.py.)
A packed weight costs the weight's memory once more, so the engine packs only what its own forward
computes (`PlainDecoder`'s projections and the output head), once: base weights never change.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import device_paths

# Input sizes timed apart, as (the most rows of the band, the rows timed for it): a single
# sequence's decode step (where packing every weight regardless made sampling one sequence several
# times slower on the Xeon: bench/packed_choice.py); decode steps of a few candidates; larger
# batches and training micro-batches.
BANDS = ((1, 1), (16, 4), (None, 128))
_PROBE_REPEATS = 3

# Per weight shape and dtype: whether the packed copy was faster, band by band.
_measured: dict[tuple, tuple[bool, ...]] = {}


@dataclass(frozen=True)
class PackedWeight:
    """A frozen weight in oneDNN's blocked layout, and the input sizes it is the faster way for."""

    blocked: torch.Tensor
    faster: tuple[bool, ...]  # per band of BANDS

    def serves(self, rows: int) -> bool:
        for (most, _), faster in zip(BANDS, self.faster):
            if most is None or rows <= most:
                return faster
        return False


# (weight, its blocked copy) -> whether the copy is faster, band by band.
Chooser = Callable[[torch.Tensor, torch.Tensor], tuple[bool, ...]]


def pack(weight: torch.Tensor, choose: Chooser | None = None) -> PackedWeight | None:
    """`weight` [out, in] packed for oneDNN, or None where that does not apply (not a float32 CPU
    tensor, a torch without oneDNN), does not reproduce `F.linear` on a probe, or was not faster
    for any input size. `choose`: by default `measured_choice`."""
    if (
        not device_paths.cpu_kernels(weight.device)
        or weight.dtype != torch.float32
        or weight.dim() != 2
        or not torch.backends.mkldnn.is_available()
    ):
        return None
    weight = weight.detach()
    try:
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        if not torch.allclose(_forward(probe, blocked, None), F.linear(probe, weight), rtol=1e-4, atol=1e-5):
            return None
    except (AttributeError, RuntimeError):  # the op is missing or refuses this weight
        return None
    faster = tuple((choose or measured_choice)(weight, blocked))
    return PackedWeight(blocked, faster) if any(faster) else None


def measured_choice(weight: torch.Tensor, blocked: torch.Tensor) -> tuple[bool, ...]:
    """Whether `blocked` beat `F.linear`, band by band, measured once per weight shape (a weight's
    values do not change the speed)."""
    key = (tuple(weight.shape), weight.dtype)
    if key not in _measured:
        _measured[key] = time_bands(
            weight.shape[1], lambda x: _forward(x, blocked, None), lambda x: F.linear(x, weight)
        )
    return _measured[key]


def time_bands(
    width: int, packed: Callable[[torch.Tensor], object], unpacked: Callable[[torch.Tensor], object]
) -> tuple[bool, ...]:
    """Whether `packed(x)` beat `unpacked(x)` at each band's rows (x [rows, width]): the medians
    of a few alternating calls after one of each to warm up."""
    return tuple(
        _faster(packed, unpacked, torch.randn(rows, width, generator=torch.Generator().manual_seed(0)))
        for _, rows in BANDS
    )


def _faster(packed, unpacked, x: torch.Tensor) -> bool:
    seconds: tuple[list[float], list[float]] = ([], [])
    for repeat in range(_PROBE_REPEATS + 1):  # the first round warms up
        for path, times in zip((unpacked, packed), seconds):
            start = time.perf_counter()
            path(x)
            if repeat:
                times.append(time.perf_counter() - start)
    return statistics.median(seconds[1]) < statistics.median(seconds[0])


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """F.linear(x, weight, bias), by the packed weight where it serves x's size (differentiable in x)."""
    if (
        packed is None
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or not packed.serves(_rows(x))
    ):
        return F.linear(x, weight, bias)
    if x.requires_grad and torch.is_grad_enabled():
        return _PackedLinear.apply(x, weight, bias, packed.blocked)
    return _forward(x, packed.blocked, bias)


def _forward(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")


class _PackedLinear(torch.autograd.Function):
    """The forward by oneDNN; the input's gradient grad @ weight by the plain weight (the weights
    are frozen: no gradient of their own)."""

    @staticmethod
    def forward(ctx, x, weight, bias, blocked):
        ctx.save_for_backward(weight)
        return _forward(x, blocked, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None, None
