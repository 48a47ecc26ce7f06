"""The sampler against the hardware: tokens/s x 2 x parameters as a fraction of the measured
fp32 matmul peak, at the rejection-sampling shape (16 prompts x 8 candidates x 128 new tokens).

    python bench/sampler_peak.py [--model smollm2|tiny] [--repeats 2] [--profile]

The peak is measured just before and just after every round (best of 2048^2 and 4096^2
`torch.mm`), and each round's fraction uses the peak measured beside it, since this machine's
speed drifts between minutes and other jobs share it. Every round samples twice, alternating: with
the candidates of a prompt sharing one copy of its KV cache (prompt_attention.py, the default) and
with the cache copied to each candidate (the path before it, and the one for models it does not
support); `shared_over_copied` is their speed ratio, side by side. 2 x parameters is the matmul work of one
decoded token (the tied output projection counted once, attention over the cache not counted):
the issue's formula. `--profile` prints torch.profiler's top operators for one extra round.
Results: bench/results/sampler_peak_<model>.json.
"""

from __future__ import annotations

import json
import os
import time

import torch
from run import (
    LORA,
    RESULTS_DIR,
    TEMPERATURE,
    Workload,
    load,
    log,
    machine,
    matmul_peak,
    side_bench_arguments,
    tiny_model_dir,
)

from eztinker.engine import Engine, SampleSpec
from eztinker.engine import sampler as sampler_module
from eztinker.types import SamplingParams

PROMPTS, CANDIDATES, NEW_TOKENS = 16, 8, 128


def main() -> None:
    parser = side_bench_arguments(__doc__)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    base = load(args.model, args.cache_dir, tiny_model_dir(args.model))
    engine = Engine(base)
    engine.warm_up()  # as the backend does: weights packed before any timed call
    engine.create_run("bench", LORA, seed=0)
    prompts = Workload(base, quick=False).prompts[:PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=TEMPERATURE, seed=0)
    n_params = sum(p.numel() for p in base.model.parameters())

    def sample() -> tuple[int, float]:
        start = time.perf_counter()
        out = engine.sample([SampleSpec("bench", prompts, CANDIDATES, params)])[0]
        return sum(len(c.tokens) for per in out for c in per), time.perf_counter() - start

    engine.sample([SampleSpec("bench", prompts[:1], 2, params.model_copy(update={"max_tokens": 4}))])  # warm-up
    rounds, worth_sharing = [], sampler_module._worth_sharing
    for _ in range(args.repeats):
        for cache in ("shared", "copied"):
            sampler_module._worth_sharing = worth_sharing if cache == "shared" else (lambda prompts, candidates: False)
            before = matmul_peak()
            tokens, seconds = sample()
            after = matmul_peak()
            rate = tokens / seconds
            rounds.append(
                {
                    "prompt_cache": cache,
                    "tokens": tokens,
                    "seconds": seconds,
                    "tokens_per_s": rate,
                    "peak_before": before,
                    "peak_after": after,
                    "fraction_of_peak": rate * 2 * n_params / max(before, after),
                    "load_1min": os.getloadavg()[0],
                }
            )
            log(
                f"  {cache:6s}: {tokens} tokens in {seconds:.1f} s = {rate:.0f} tokens/s; peak "
                f"{max(before, after) / 1e9:.0f} "
                f"GFLOP/s; {100 * rounds[-1]['fraction_of_peak']:.1f}% of it (load {rounds[-1]['load_1min']:.1f})"
            )
    sampler_module._worth_sharing = worth_sharing
    shared = [r for r in rounds if r["prompt_cache"] == "shared"]
    best = max(shared, key=lambda r: r["fraction_of_peak"])
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(shared, rounds[1::2])]
    results = {
        "model": args.model,
        "parameters": n_params,
        "shape": f"{PROMPTS} x {CANDIDATES} x {NEW_TOKENS}",
        "prompt_tokens": [len(p) for p in prompts],
        "machine": machine(),
        "rounds": rounds,
        "best": best,
        "shared_over_copied": ratios,
        "command": f"python bench/sampler_peak.py --model {args.model} --repeats {args.repeats}",
    }
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            sample()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        log(table)
        results["profile_top_ops"] = table
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"sampler_peak_{args.model}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    log(
        f"best round: {100 * best['fraction_of_peak']:.1f}% of the fp32 matmul peak; shared / copied prompt cache: "
        f"{', '.join(f'{r:.2f}x' for r in ratios)}; results: {path}"
    )


if __name__ == "__main__":
    main()
