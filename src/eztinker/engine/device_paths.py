"""Which kernels the engine takes on a device: the CPU-only ones, or the portable ones a GPU runs.

The CPU has tricks of its own: base weights packed for oneDNN (packed_linear.py), the output
head's logits in column blocks (output_projection.py), and the fused CPU attention kernel that
also returns its log-sum-exp (prompt_attention.py). A GPU takes the plain path of each. Within
`portable_kernels()` the CPU takes the plain paths too, so that CI runs, on the CPU and in bf16,
the code a GPU runs (tests/test_bf16.py, bench/gpu_check.py --smoke).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Process-wide on purpose: the engine's torch work runs on one thread, and an engine packs its
# weights when it is built, so the choice must hold from its construction to its last call.
_portable = False


def cpu_kernels(device: torch.device | str) -> bool:
    """Whether work on `device` may take the CPU-only kernels."""
    return torch.device(device).type == "cpu" and not _portable


@contextmanager
def portable_kernels() -> Iterator[None]:
    """Within: the CPU takes the kernels a GPU takes (build the engine inside, use it inside)."""
    global _portable
    previous, _portable = _portable, True
    try:
        yield
    finally:
        _portable = previous
