"""Which library multiplies the base weights, side by side: the same engine calls (LoRA rank 8)
with every projection and the output head

  * all-packed:  packed for oneDNN and used at every input size (the engine before each weight's
                 packed copy served only the sizes where it measured faster);
  * measured:    packed, and used only at the sizes where `packed_linear.measured_choice` timed it
                 faster than MKL's F.linear on this machine (the head: than MKL in column blocks;
                 the engine's default);
  * unpacked:    `Engine(pack_weights=False)`: MKL's F.linear throughout (the head in column blocks).

    python bench/packed_choice.py [--model smollm2|tiny] [--repeats 2] [--calls 5]

Calls: sampling one sequence of 32 tokens (a chat request's shape), 4 x 16 tokens from one prompt,
and 16 GSM8K prompts x 8 candidates x 32 tokens; a forward of 1 x 8 tokens and a forward_backward of
4 x 32. Each choice runs in a child process of its own (the measured choice is made once per
process), the three alternating, `--repeats` rounds; the median of each child's steady calls is
reported, and the best round per choice counts. Results: bench/results/packed_choice_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

CHOICES = ("all-packed", "measured", "unpacked")
CALLS = ("sample_1x1x32", "sample_1x4x16", "sample_16x8x32", "forward_1x8", "forward_backward_4x32")


def child(choice: str, model: str, cache_dir: Path, calls: int) -> dict:
    from run import TEMPERATURE, Workload, load, tiny_model_dir

    from eztinker.engine import Engine, SampleSpec, output_projection, packed_linear
    from eztinker.types import Datum, LoraConfig, LossFnInputs, ModelInput, SamplingParams

    if choice == "all-packed":
        packed_linear.measured_choice = output_projection._head_choice = lambda weight, blocked: (
            (True,) * len(packed_linear.BANDS)
        )
    base = load(model, cache_dir, tiny_model_dir(model))
    engine = Engine(base, pack_weights=choice != "unpacked")
    engine.warm_up()  # as the backend does: weights packed before any timed call
    engine.create_run("r", LoraConfig(rank=8, alpha=32.0))
    prompts = Workload(base, quick=False).prompts[:16]
    rng = random.Random(0)

    def datum(length: int) -> Datum:
        ids = [rng.randrange(100, 20000) for _ in range(length + 1)]
        return Datum(
            model_input=ModelInput(tokens=ids[:-1]),
            loss_fn_inputs=LossFnInputs(target_tokens=ids[1:], weights=[1.0] * length),
        )

    def sample(n_prompts: int, candidates: int, tokens: int):
        params = SamplingParams(max_tokens=tokens, temperature=TEMPERATURE, seed=0)
        return lambda: engine.sample([SampleSpec("r", prompts[:n_prompts], candidates, params)])

    one, four = [datum(8)], [datum(32) for _ in range(4)]
    work = {
        "sample_1x1x32": sample(1, 1, 32),
        "sample_1x4x16": sample(1, 4, 16),
        "sample_16x8x32": sample(16, 8, 32),
        "forward_1x8": lambda: engine.forward_backward("r", one, forward_only=True),
        "forward_backward_4x32": lambda: engine.forward_backward("r", four),
    }
    seconds: dict[str, list[float]] = {name: [] for name in CALLS}
    for i in range(calls + 1):  # call 0 warms up
        for name in CALLS:
            start = time.perf_counter()
            work[name]()
            if i:
                seconds[name].append(time.perf_counter() - start)
    decisions = {
        "x".join(map(str, shape)): faster
        for (shape, _), faster in {**packed_linear._measured, **output_projection._measured}.items()
    }
    return {
        "median_seconds": {name: statistics.median(values) for name, values in seconds.items()},
        "decisions": decisions,
    }


def main() -> None:
    from run import RESULTS_DIR, alternate_in_children, log, machine, side_bench_arguments

    parser = side_bench_arguments(__doc__)
    parser.add_argument("--calls", type=int, default=5, help="steady calls of each kind per child")
    parser.add_argument("--choice", choices=CHOICES, help=argparse.SUPPRESS)  # a child's choice
    args = parser.parse_args()
    if args.choice:
        return print(json.dumps(child(args.choice, args.model, args.cache_dir, args.calls)))
    rounds, best = alternate_in_children(__file__, "choice", CHOICES, args, CALLS)
    for row in rounds:
        if row["choice"] == "measured":
            log(f"  round {row['round']}: the packed copy faster (1 row, 2-16, more): {row['decisions']}")
    ratios = {
        name: {
            f"{choice}_over_measured": best[choice][name] / best["measured"][name]
            for choice in ("all-packed", "unpacked")
        }
        for name in CALLS
    }
    for name, row in ratios.items():
        log(
            f"{name:22s} all-packed / measured {row['all-packed_over_measured']:.2f}x; unpacked / measured "
            f"{row['unpacked_over_measured']:.2f}x"
        )
    out = RESULTS_DIR / f"packed_choice_{args.model}.json"
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "machine": machine(),
                "rounds": rounds,
                "best": best,
                "ratios": ratios,
                "command": (
                    f"python bench/packed_choice.py --model {args.model} --repeats {args.repeats} --calls {args.calls}"
                ),
            },
            indent=1,
        )
        + "\n"
    )
    log(f"results: {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
