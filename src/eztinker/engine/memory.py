"""How many tokens a training micro-batch may hold, from the device's free memory.

A fixed budget (8192 padded tokens) either wastes a large GPU or runs a 7B model out of memory,
and on the CPU it ran a server out of host memory: SmolLM2-135M's training forward keeps about
1.7 MB a token there, so 8192 tokens took 14 GB beside a second server on a 24 GB machine.
The training forward's activation memory grows with the tokens of a micro-batch; what a token
costs is counted here from the model's shape (what autograd keeps of `PlainDecoder.causal` per
layer), and the budget is what fits in a share of the memory free once the model is loaded.
bench/gpu_check.py records the measured peaks beside these estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

CPU_MICROBATCH_TOKENS = 8192  # the CPU's most: larger forwards are no faster there
# On the CPU the measured peak exceeds the estimate below (which counts what the GPU path keeps):
# 1.7x for SmolLM2-135M in float32, a 2048-token micro-batch (3.5 GB; docs/performance.md).
CPU_ESTIMATE_MARGIN = 2.0
MIN_MICROBATCH_TOKENS = 512
MAX_MICROBATCH_TOKENS = 64 * 1024  # beyond this a forward gains nothing and sampling's memory gets squeezed
FREE_MEMORY_SHARE = 0.5  # the rest: the sampler's KV caches and logits, the allocator's fragmentation


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # key/value heads x head size

    @classmethod
    def of(cls, config) -> DecoderShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, kv_heads * head_dim)


def layer_bytes_per_token(shape: DecoderShape, dtype: torch.dtype) -> int:
    """What one layer's forward keeps for the backward pass, per token: the two norms' float32
    inputs, their outputs (the q/k/v and gate/up LoRA inputs), q, k, v and the attention output,
    and the MLP's gate, up and product (the down projection's LoRA input)."""
    size = dtype.itemsize
    return 2 * 4 * shape.hidden + size * (4 * shape.hidden + 2 * shape.kv_width + 3 * shape.intermediate)


def training_bytes_per_token(shape: DecoderShape, dtype: torch.dtype, checkpointing: bool) -> int:
    """Activation memory of a training forward per token. With checkpointing, each layer keeps
    only its input, and one layer's full set is alive at a time (recomputed in the backward)."""
    full = layer_bytes_per_token(shape, dtype)
    if checkpointing:
        return shape.layers * dtype.itemsize * shape.hidden + full
    return shape.layers * full


def microbatch_token_budget(free_bytes: int, bytes_per_token: int) -> int:
    """The padded tokens of a micro-batch that fit in FREE_MEMORY_SHARE of `free_bytes`, rounded
    down to a multiple of 512 and kept within [MIN_MICROBATCH_TOKENS, MAX_MICROBATCH_TOKENS]."""
    tokens = int(free_bytes * FREE_MEMORY_SHARE) // max(1, bytes_per_token)
    return max(MIN_MICROBATCH_TOKENS, min(MAX_MICROBATCH_TOKENS, tokens // 512 * 512))


def host_available_memory() -> int | None:
    """Bytes the kernel could give this process now (Linux's MemAvailable), else None."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def default_microbatch_tokens(config, dtype: torch.dtype, device: torch.device, checkpointing: bool) -> int:
    """The budget on `device`, from the memory free once the model is loaded: an accelerator's own,
    or on the CPU the host's (at most CPU_MICROBATCH_TOKENS; that when the host does not say)."""
    per_token = training_bytes_per_token(DecoderShape.of(config), dtype, checkpointing)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return microbatch_token_budget(int(free), per_token)
    available = host_available_memory()
    if available is None:
        return CPU_MICROBATCH_TOKENS
    return min(CPU_MICROBATCH_TOKENS, microbatch_token_budget(available, int(per_token * CPU_ESTIMATE_MARGIN)))
