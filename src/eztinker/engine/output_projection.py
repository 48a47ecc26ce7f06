"""The output projection's logits, written into a caller's buffer a block of vocabulary columns at a time.

On CPU one [rows, V] matmul against a 49k-152k-row weight runs well below the speed of the same
work in blocks of 1024 columns, each block's weights and outputs used while they are in cache
(most at the sampler's few rows; docs/performance.md, "Engine figures"); oneDNN with the weight
packed (packed_linear.py) can be faster again, and is used where it measured so. The backward
product (logit gradients times the weight) gains nothing from blocking and stays whole.
"""

from __future__ import annotations

import torch

from . import device_paths, packed_linear

BLOCK_COLUMNS = 1024

# Per head shape and dtype: whether logits by the packed copy beat logits by column blocks, band by band.
_measured: dict[tuple, tuple[bool, ...]] = {}


def logits_into(
    out_R_V: torch.Tensor,
    hidden_R_D: torch.Tensor,
    weight_V_D: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    packed: packed_linear.PackedWeight | None = None,
) -> torch.Tensor:
    """The logits hidden @ weight.T (+ bias): written into `out` and returned, or, by `packed` (the
    weight packed for oneDNN, packed_linear.py, for the row counts where it measured faster), a new
    tensor: oneDNN's linear has no out= form, and copying its result into `out` would add a
    vocabulary-wide copy to every call (every training chunk, every decode step)."""
    if packed is not None and packed.serves(hidden_R_D.shape[0]):
        return packed_linear.linear(hidden_R_D, weight_V_D, bias_V, packed)
    if weight_V_D.dtype != out_R_V.dtype:
        out_R_V.copy_(torch.nn.functional.linear(hidden_R_D.to(weight_V_D.dtype), weight_V_D, bias_V))
        return out_R_V
    block = BLOCK_COLUMNS if device_paths.cpu_kernels(out_R_V.device) else weight_V_D.shape[0]
    for start in range(0, weight_V_D.shape[0], block):
        columns = slice(start, start + block)
        if bias_V is None:
            torch.mm(hidden_R_D, weight_V_D[columns].t(), out=out_R_V[:, columns])
        else:
            torch.addmm(bias_V[columns], hidden_R_D, weight_V_D[columns].t(), out=out_R_V[:, columns])
    return out_R_V


def pack_head(weight_V_D: torch.Tensor) -> packed_linear.PackedWeight | None:
    """The output head's copy packed for oneDNN, serving the sizes where `logits_into` by it beat
    `logits_into` by MKL's column blocks (the path without it, which wins for some head shapes and
    CPUs: docs/performance.md, "Engine figures"), or None."""
    return packed_linear.pack(weight_V_D, choose=_head_choice)


def _head_choice(weight_V_D: torch.Tensor, blocked: torch.Tensor) -> tuple[bool, ...]:
    key = (tuple(weight_V_D.shape), weight_V_D.dtype)
    if key not in _measured:
        everywhere = packed_linear.PackedWeight(blocked, (True,) * len(packed_linear.BANDS))
        out = torch.empty(max(rows for _, rows in packed_linear.BANDS), weight_V_D.shape[0], dtype=weight_V_D.dtype)
        _measured[key] = packed_linear.time_bands(
            weight_V_D.shape[1],
            lambda x: logits_into(out[: len(x)], x, weight_V_D, None, everywhere),
            lambda x: logits_into(out[: len(x)], x, weight_V_D),
        )
    return _measured[key]
