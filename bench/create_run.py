"""Creating runs on one base model, side by side: peft's add_adapter (which walks every module,
earlier adapters' LoRA modules included); adding the adapter to the already-wrapped LoRA layers by
peft's per-layer `update_layer` (which walks every adapter of the layer); and by the engine's
own `lora_adapters.add` (the default).

    python bench/create_run.py [--model smollm2|tiny] [--runs 10] [--repeats 2]

Each round creates `--runs` rank-8 runs one after another on a fresh engine, once per path,
alternating; every create is timed. The loaded objects are frozen out of the garbage
collector's full passes first, as the server does. Results: bench/results/create_run_<model>.json.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time

from run import RESULTS_DIR, load, log, machine, side_bench_arguments, tiny_model_dir

import eztinker.engine.adapters as engine_module
import eztinker.engine.lora_adapters as lora_adapters
from eztinker.engine import Engine
from eztinker.types import LoraConfig


def main() -> None:
    parser = side_bench_arguments(__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    base = load(args.model, args.cache_dir, tiny_model_dir(args.model))
    gc.freeze()
    fast, can_add = engine_module._UPDATE_LAYER_TAKES_CONFIG, lora_adapters.can_add
    paths = ("peft_add_adapter", "update_layer", "lora_adapters")
    seconds: dict[str, list[list[float]]] = {path: [] for path in paths}
    for _ in range(args.repeats):
        for path in seconds:
            engine_module._UPDATE_LAYER_TAKES_CONFIG = fast and path != "peft_add_adapter"
            lora_adapters.can_add = can_add if path == "lora_adapters" else (lambda layers, config: False)
            engine, times = Engine(base), []
            for i in range(args.runs):
                start = time.perf_counter()
                engine.create_run(f"r{i}", LoraConfig(rank=8), seed=i)
                times.append(time.perf_counter() - start)
            engine.close()
            seconds[path].append(times)
            log(f"  {path}: " + " ".join(f"{t:.3f}" for t in times) + " s")
    engine_module._UPDATE_LAYER_TAKES_CONFIG, lora_adapters.can_add = fast, can_add
    # The first create of an engine wraps the model (the same on every path): medians of the rest.
    medians = {path: statistics.median(t for r in rounds for t in r[1:]) for path, rounds in seconds.items()}
    results = {
        "model": args.model,
        "runs": args.runs,
        "machine": machine(),
        "load_1min": os.getloadavg()[0],
        "seconds": seconds,
        "median_seconds_after_the_first": medians,
        "ratios_to_lora_adapters": {path: medians[path] / medians["lora_adapters"] for path in paths},
        "command": f"python bench/create_run.py --model {args.model} --runs {args.runs} --repeats {args.repeats}",
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"create_run_{args.model}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    log(
        "median create after the first: "
        + ", ".join(
            f"{name} {medians[name] * 1e3:.0f} ms ({results['ratios_to_lora_adapters'][name]:.1f}x)" for name in paths
        )
        + f"; results: {path}"
    )


if __name__ == "__main__":
    main()
