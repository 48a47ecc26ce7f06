"""One optim_step of a LoRA on every linear layer: torch's default CPU AdamW (a Python loop of
about ten operations per tensor) against the fused one the engine steps with, side by side.

    python bench/optim_step.py [--model smollm2|tiny] [--rank 8] [--repeats 20]

Both optimizers step the same run's parameters from the same gradients (one real
forward_backward), alternating call by call; each call includes the gradient-norm clipping the
engine does. Results: bench/results/optim_step_<model>.json.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import torch
from run import RESULTS_DIR, load, log, machine, side_bench_arguments, tiny_model_dir

from eztinker.chat import datum_from_tokens
from eztinker.engine import Engine
from eztinker.types import LoraConfig


def main() -> None:
    parser = side_bench_arguments(__doc__)
    parser.add_argument("--rank", type=int, default=8)
    parser.set_defaults(repeats=20)  # calls per optimizer
    args = parser.parse_args()
    repeats = args.repeats
    base = load(args.model, args.cache_dir, tiny_model_dir(args.model))
    engine = Engine(base)
    engine.warm_up()  # as the backend does: weights packed before any timed call
    engine.create_run("bench", LoraConfig(rank=args.rank), seed=0)
    params = engine._runs["bench"].params
    engine.forward_backward("bench", [datum_from_tokens(list(range(100, 132)), list(range(200, 232)))])
    grads = [p.grad.clone() for p in params]
    optimizers = {
        "loop": torch.optim.AdamW(params, lr=1e-6, foreach=False),
        "fused": torch.optim.AdamW(params, lr=1e-6, fused=True),
    }
    seconds = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, optimizer in optimizers.items():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            start = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, math.inf)
            optimizer.step()
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(s[1:]) for name, s in seconds.items()}
    results = {
        "model": args.model,
        "lora_rank": args.rank,
        "tensors": len(params),
        "parameters": sum(p.numel() for p in params),
        "machine": machine(),
        "load_1min": os.getloadavg()[0],
        "seconds": seconds,
        "median_seconds": medians,
        "loop_over_fused": medians["loop"] / medians["fused"],
        "command": f"python bench/optim_step.py --model {args.model} --rank {args.rank} --repeats {repeats}",
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"optim_step_{args.model}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    log(
        f"{len(params)} tensors ({results['parameters']:,} parameters): loop {medians['loop'] * 1e3:.1f} ms, "
        f"fused {medians['fused'] * 1e3:.1f} ms, {results['loop_over_fused']:.1f}x; results: {path}"
    )


if __name__ == "__main__":
    main()
