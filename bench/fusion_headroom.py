"""What fusing several runs' forward_backward into one pass could gain here, at most.

    python bench/fusion_headroom.py [--model smollm2|tiny] [--runs 4] [--examples 8] [--repeats 2]

A fused pass over R runs' batches does the work of one pass over all their examples, plus the
per-row adapter masks. This times, side by side on the same weights and the same GSM8K examples
(question -> reference solution, prompt weight 0):
  * separate: R `forward_backward` calls of `--examples` examples each, one per run;
  * one pass: a single `forward_backward` of all R x `--examples` examples on one run,
which bounds the fused pass's speed from above. Results go to bench/results/fusion_headroom_<model>.json.
"""

from __future__ import annotations

import json

from run import (
    LORA,
    RESULTS_DIR,
    Timer,
    Workload,
    interleave,
    load,
    log,
    machine,
    matmul_peak,
    side_bench_arguments,
    tiny_model_dir,
)

from eztinker.engine import Engine


def main() -> None:
    parser = side_bench_arguments(__doc__)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--examples", type=int, default=8, help="Examples per run.")
    args = parser.parse_args()
    base = load(args.model, args.cache_dir, tiny_model_dir(args.model))
    examples = Workload(base, quick=False).examples[: args.runs * args.examples]
    engine = Engine(base)
    engine.warm_up()  # as the backend does: weights packed before any timed call
    runs = [f"run{r}" for r in range(args.runs)]
    for r, run_id in enumerate(runs):
        engine.create_run(run_id, LORA, seed=r)
    per_run = [examples[r * args.examples : (r + 1) * args.examples] for r in range(args.runs)]
    log(
        f"== {args.model}: {args.runs} runs x {args.examples} examples of "
        f"{min(len(d.model_input.tokens) for d in examples)}-{max(len(d.model_input.tokens) for d in examples)} tokens"
    )
    peak = matmul_peak()
    log(f"  fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")

    def timed(fn):
        def side():
            with Timer() as t:
                fn()
            return len(examples), t.seconds

        return side

    engine.forward_backward(runs[0], examples[:2])  # warm-up, untimed
    sides = {
        "separate_per_run": timed(
            lambda: [engine.forward_backward(run_id, data) for run_id, data in zip(runs, per_run)]
        ),
        "one_pass_all_examples": timed(lambda: engine.forward_backward(runs[0], examples)),
    }
    results = interleave(sides, args.repeats)
    ratio = results["one_pass_all_examples"]["per_s"] / results["separate_per_run"]["per_s"]
    log(f"  headroom of fusion: {ratio:.2f}x")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"fusion_headroom_{args.model}.json"
    path.write_text(
        json.dumps(
            {
                "model": args.model,
                "machine": machine(),
                "matmul_peak_flops": peak,
                "runs": args.runs,
                "examples_per_run": args.examples,
                "unit": "examples/s",
                "sides": results,
                "headroom": ratio,
            },
            indent=1,
        )
    )
    log(f"results: {path}")


if __name__ == "__main__":
    main()
