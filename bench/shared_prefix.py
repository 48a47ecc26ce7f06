"""The demo's sampling with and without the shared-prefix prefill, side by side in one process.

    python bench/shared_prefix.py [--model smollm2|tiny] [--repeats 2]

The demo's prompts (arithmetic task: system prompt + one worked example + the question) share
their first ~100 tokens. The sampler prefills that common prefix once and copies its KV cache to
every row; with the prefill off (its threshold set above any prompt's length) every row prefills
its whole prompt. Both sides sample the demo's workloads from one adapter on the same weights:
  * candidates: 64 training problems x 4 candidates x 64 new tokens at temperature 0.8, seeded;
  * evaluation: 200 test problems x 1 greedy candidate x 64 new tokens.
Results (every timing and the 1-minute load average) go to bench/results/shared_prefix_<model>.json.
"""

from __future__ import annotations

import json

import torch
from run import (
    LORA,
    RESULTS_DIR,
    TEMPERATURE,
    Timer,
    agreement,
    interleave,
    load,
    log,
    machine,
    matmul_peak,
    side_bench_arguments,
    tiny_model_dir,
)

import eztinker.engine.sampler as sampler
from eztinker.chat import render_prompt
from eztinker.engine import Engine, SampleSpec
from eztinker.tasks import get_task
from eztinker.types import SamplingParams

SHARING_ON = sampler._MIN_SHARED_PREFIX
SHARING_OFF = 1 << 30  # longer than any prompt: never share


def main() -> None:
    parser = side_bench_arguments(__doc__)
    args = parser.parse_args()
    base = load(args.model, args.cache_dir, tiny_model_dir(args.model))
    engine = Engine(base)
    engine.warm_up()  # as the backend does: weights packed before any timed call
    engine.create_run("bench", LORA, seed=0)
    task = get_task("arithmetic")

    def prompts(split: str, limit: int) -> list[list[int]]:
        return [render_prompt(base.tokenizer, task.messages_for(p)) for p in task.load_problems(split, limit=limit)]

    workloads = {
        "candidates": (prompts("train", 64), 4, SamplingParams(max_tokens=64, temperature=TEMPERATURE, seed=0)),
        "evaluation": (prompts("test", 200), 1, SamplingParams(max_tokens=64, temperature=0.0)),
    }
    shared = sampler._common_prefix_length(workloads["candidates"][0])
    log(
        f"== {args.model}: prompts of {min(map(len, workloads['candidates'][0]))}-"
        f"{max(map(len, workloads['candidates'][0]))} tokens, {shared} shared; {torch.get_num_threads()} threads"
    )
    peak = matmul_peak()
    log(f"  fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    results: dict = {
        "model": args.model,
        "machine": machine(),
        "matmul_peak_flops": peak,
        "shared_prefix_tokens": shared,
    }
    outputs: dict[str, list] = {}

    def side(name: str, workload: str, threshold: int):
        prompt_ids, n, params = workloads[workload]

        def run():
            sampler._MIN_SHARED_PREFIX = threshold
            try:
                with Timer() as t:
                    out = engine.sample([SampleSpec("bench", prompt_ids, n, params)])[0]
            finally:
                sampler._MIN_SHARED_PREFIX = SHARING_ON
            outputs[name] = [c for per in out for c in per]
            return sum(len(c.tokens) for c in outputs[name]), t.seconds

        return run

    engine.sample([SampleSpec("bench", workloads["evaluation"][0][:2], 2, SamplingParams(max_tokens=4))])  # warm-up
    for workload in workloads:
        log(f"  {workload}")
        sides = {
            "shared_prefix": side("on", workload, SHARING_ON),
            "every_prompt_whole": side("off", workload, SHARING_OFF),
        }
        timed = interleave(sides, args.repeats)
        results[workload] = {
            "unit": "tokens/s",
            "sides": timed,
            "ratio": timed["shared_prefix"]["per_s"] / timed["every_prompt_whole"]["per_s"],
            **agreement(outputs["on"], outputs["off"]),
        }
        log(
            f"    ratio {results[workload]['ratio']:.2f}x; identical candidates "
            f"{results[workload]['identical_candidates']}"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"shared_prefix_{args.model}.json"
    path.write_text(json.dumps(results, indent=1))
    log(f"results: {path}")


if __name__ == "__main__":
    main()
