"""A sampling decode step's attention over each row's own generated keys (the second part of
`prompt_attention`'s two), against reading the same keys and values once: how far the kernels are
from this CPU's memory rate.

    python bench/decode_attention.py [--repeats 10] [--compile]

SmolLM2-135M's shape at 16 prompts x 8 candidates: 128 rows, 3 key/value heads of 3 query heads
each, head size 64, in a [rows, kv, 160, 64] buffer sliced to the generated length, 30 layers'
worth of buffers so that nothing stays in cache. Per layer, medians over the repeats:
  * sum: `keys.sum()` and `values.sum()`, the memory floor of any kernel;
  * fused: the CPU flash-attention kernel the sampler uses (it returns the log-sum-exp);
  * matmul: scores, log-sum-exp and the weighted values written out;
  * with --compile, both written-out forms through `torch.compile` (inductor; needs a C++
    compiler, and compiles for about a minute): as matmuls, and as pointwise products and sums.
Results: bench/results/decode_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from run import RESULTS_DIR, log, machine

ROWS, KV, REP, DIM, CAPACITY, LAYERS = 128, 3, 3, 64, 160, 30
SCALE = DIM**-0.5


def fused(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=SCALE)


def matmul(q, k, v):
    scores = torch.matmul(q, k.transpose(-1, -2)) * SCALE
    lse = torch.logsumexp(scores, -1, keepdim=True)
    return torch.matmul((scores - lse).exp(), v), lse


def pointwise(q, k, v):
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * SCALE  # [rows, kv, rep, length]
    lse = torch.logsumexp(scores, -1, keepdim=True)
    return ((scores - lse).exp().unsqueeze(-1) * v.unsqueeze(-3)).sum(-2), lse


def read(q, k, v):
    return k.sum() + v.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    buffers = [(torch.randn(ROWS, KV, CAPACITY, DIM), torch.randn(ROWS, KV, CAPACITY, DIM)) for _ in range(LAYERS)]
    q = torch.randn(ROWS, KV, REP, DIM)
    kernels = {"sum": read, "fused": fused, "matmul": matmul}
    if args.compile:
        kernels["compiled_matmul"] = torch.compile(matmul, dynamic=True)
        kernels["compiled_pointwise"] = torch.compile(pointwise, dynamic=True)
    results: dict = {"machine": machine(), "load_1min": os.getloadavg()[0], "ms_per_layer": {}}
    for length in (16, 64, 128):
        views = [(k[:, :, :length], v[:, :, :length]) for k, v in buffers]
        reference = matmul(q, *views[0])[0]
        row = {}
        for name, kernel in kernels.items():
            if name != "sum":  # the same output as written out, to rounding
                torch.testing.assert_close(kernel(q, *views[0])[0], reference, rtol=1e-4, atol=1e-5)
            for k, v in views[:3]:  # warm-up (and compilation)
                kernel(q, k, v)
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for k, v in views:
                    kernel(q, k, v)
                seconds.append((time.perf_counter() - start) / LAYERS)
            row[name] = statistics.median(seconds) * 1e3
        results["ms_per_layer"][length] = row
        log(f"generated length {length}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in row.items()))
    results["command"] = "python bench/decode_attention.py" + (" --compile" if args.compile else "")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "decode_attention.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
