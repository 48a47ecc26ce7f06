"""The output projection in blocks of vocabulary columns (engine/output_projection.py) against one
matmul over the whole vocabulary, side by side, at the sampler's and training's row counts.

    python bench/output_projection.py [--repeats 5]

Shapes: SmolLM2-135M (49152 x 576) and Qwen2-0.5B (151936 x 896) heads, random fp32 weights;
every round times each path once, alternating; medians and their ratio. Results:
bench/results/output_projection.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from run import RESULTS_DIR, log, machine

from eztinker.engine.output_projection import logits_into

HEADS = {"smollm2-135m": (49152, 576), "qwen2-0.5b": (151936, 896)}
ROWS = (4, 32, 128, 512, 1024)


def whole(out, hidden, weight):
    torch.mm(hidden, weight.t(), out=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"machine": machine(), "threads": torch.get_num_threads(), "cases": [],
               "command": f"python bench/output_projection.py --repeats {args.repeats}"}
    for name, (vocab, width) in HEADS.items():
        weight = torch.randn(vocab, width) / width**0.5
        for rows in ROWS:
            hidden, out = torch.randn(rows, width), torch.empty(rows, vocab)
            times = {"whole": [], "blocked": []}
            for _ in range(args.repeats + 1):  # the first round warms up
                for path, fn in (("whole", whole), ("blocked", logits_into)):
                    start = time.perf_counter()
                    fn(out, hidden, weight)
                    times[path].append(time.perf_counter() - start)
            case = {"head": name, "rows": rows, **{f"{p}_s": statistics.median(t[1:]) for p, t in times.items()}}
            case["speedup"] = case["whole_s"] / case["blocked_s"]
            results["cases"].append(case)
            log(f"{name:13s} {rows:5d} rows: whole {1e3 * case['whole_s']:7.1f} ms, blocked {1e3 * case['blocked_s']:7.1f} ms: {case['speedup']:.2f}x")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "output_projection.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    log(f"results: {path}")


if __name__ == "__main__":
    main()
