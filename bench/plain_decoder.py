"""The decoder's forward as plain tensor ops (engine/plain_decoder.py), with its base weights packed
for oneDNN (engine/packed_linear.py, the default) and without (`F.linear`, MKL), against the same
forward through transformers' and peft's modules, side by side; and peft's `disable_adapter()`
against the engine's direct toggle, which every sampling call enters once.

    python bench/plain_decoder.py [--model smollm2|tiny] [--repeats 5]

Calls (rank-8 run): the peers workload's small ones, a forward of 1 x 8 tokens and a
forward_backward of 4 x 32, and a forward_backward of 8 x 128; sampling one GSM8K prompt's
4 candidates x 16 tokens, 4 prompts x 8 candidates x 64 tokens, and 16 prompts x 4 candidates x 1
token, nearly all prefill (seeded, temperature 1; the output head packed on every path).
Every round makes each call once per path, alternating; medians and their ratios are reported.
Results: bench/results/plain_decoder_<model>.json.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time

import peft
import torch
from run import RESULTS_DIR, Workload, load, log, machine, side_bench_arguments, tiny_model_dir

import eztinker.engine.lora_forward as lora_forward
import eztinker.engine.packed_linear as packed_linear
from eztinker.engine import Engine, SampleSpec
from eztinker.types import Datum, LoraConfig, SamplingParams


def windows(count: int, length: int, seed: int) -> list[Datum]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ids = [rng.randrange(100, 40_000) for _ in range(length + 1)]
        out.append(
            Datum(
                model_input={"tokens": ids[:-1]}, loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * length}
            )
        )
    return out


def unpacked(x, weight, bias, packed):
    return torch.nn.functional.linear(x, weight, bias)


def main() -> None:
    parser = side_bench_arguments(__doc__)
    args = parser.parse_args()
    base = load(args.model, args.cache_dir, tiny_model_dir(args.model))
    engine = Engine(base)
    engine.warm_up()  # as the backend does: weights packed before any timed call
    engine.create_run("bench", LoraConfig(rank=8), seed=0)
    prompts = Workload(base, quick=False).prompts

    def sampling(n_prompts: int, candidates: int, tokens: int):
        return lambda i: engine.sample(
            [
                SampleSpec(
                    "bench", prompts[:n_prompts], candidates, SamplingParams(max_tokens=tokens, temperature=1.0, seed=i)
                )
            ]
        )

    one, four, eight = windows(1, 8, 0), windows(4, 32, 1), windows(8, 128, 2)
    calls = {
        "forward_1x8": lambda i: engine.forward_backward("bench", one, forward_only=True),
        "forward_backward_4x32": lambda i: engine.forward_backward("bench", four),
        "forward_backward_8x128": lambda i: engine.forward_backward("bench", eight),
        "sample_1x4x16": sampling(1, 4, 16),
        "sample_4x8x64": sampling(4, 8, 64),
        "sample_16x4x1": sampling(16, 4, 1),  # nearly all prefill
    }
    plain, packed = engine.forward.plain_decoder, packed_linear.linear
    for call in calls.values():  # warm-up
        call(0)
    paths = ("plain", "plain_unpacked", "modules")
    seconds: dict[str, dict[str, list[float]]] = {name: {path: [] for path in paths} for name in calls}
    for i in range(args.repeats):
        for name, call in calls.items():
            for path in paths:
                engine.forward.plain_decoder = (lambda: None) if path == "modules" else plain
                packed_linear.linear = unpacked if path == "plain_unpacked" else packed
                start = time.perf_counter()
                call(i)
                seconds[name][path].append(time.perf_counter() - start)
            log(f"  {name}: " + ", ".join(f"{path} {seconds[name][path][-1]:.3f} s" for path in paths))
    del engine.forward.plain_decoder
    packed_linear.linear = packed
    for param in engine._runs["bench"].params:
        param.grad = None

    toggles: dict[str, list[float]] = {"peft_disable_adapter": [], "engine_base_only": []}
    for _ in range(5):
        for name, context in (
            ("peft_disable_adapter", engine.adapters.peft.disable_adapter),
            ("engine_base_only", lambda: lora_forward.base_only(engine.adapters.lora_layers())),
        ):
            start = time.perf_counter()
            with context():
                pass
            toggles[name].append(time.perf_counter() - start)

    medians = {name: {path: statistics.median(t) for path, t in paths.items()} for name, paths in seconds.items()}
    ratios = {name: m["modules"] / m["plain"] for name, m in medians.items()}
    packing = {name: m["plain_unpacked"] / m["plain"] for name, m in medians.items()}
    toggle_medians = {name: statistics.median(t) for name, t in toggles.items()}
    results = {
        "model": args.model,
        "lora_rank": 8,
        "peft": peft.__version__,
        "machine": machine(),
        "load_1min": os.getloadavg()[0],
        "seconds": seconds,
        "median_seconds": medians,
        "modules_over_plain": ratios,
        "unpacked_over_packed": packing,
        "adapter_toggle_seconds": toggles,
        "adapter_toggle_median_seconds": toggle_medians,
        "command": f"python bench/plain_decoder.py --model {args.model} --repeats {args.repeats}",
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"plain_decoder_{args.model}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    for name, m in medians.items():
        log(
            f"{name}: plain {m['plain']:.3f} s, plain unpacked {m['plain_unpacked']:.3f} s, modules "
            f"{m['modules']:.3f} s: "
            f"modules / plain {ratios[name]:.2f}x, unpacked / packed {packing[name]:.2f}x"
        )
    log(
        f"adapters off and on: peft disable_adapter {toggle_medians['peft_disable_adapter'] * 1e3:.1f} ms, "
        f"engine {toggle_medians['engine_base_only'] * 1e3:.1f} ms; results: {path}"
    )


if __name__ == "__main__":
    main()
