"""Base-weight matmuls three ways, side by side: torch's `F.linear` (MKL on x86), oneDNN with the
weight packed once (engine/packed_linear.py, which the engine uses where its own timing found it faster), and for
the output head MKL in blocks of vocabulary columns (engine/output_projection.py, the path without packed weights).

    python bench/packed_linear.py [--repeats 5]

Shapes: SmolLM2-135M's projections (576 -> 576, 192, 1536; 1536 -> 576) and head (49152 x 576),
and Qwen2-0.5B's head (151936 x 896), random fp32 weights, at 4, 32, 128, 512 and 1024 rows (a
small decode step to a training forward). Every round times each path once, alternating;
medians, and each path's speed-up over `F.linear`. Results: bench/results/packed_linear.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from run import RESULTS_DIR, log, machine

from eztinker.engine.output_projection import logits_into
from eztinker.engine.packed_linear import linear, pack

WEIGHTS = {
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 k/v 192x576": (192, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
    "smollm2 head 49152x576": (49152, 576),
    "qwen2-0.5b head 151936x896": (151936, 896),
}
ROWS = (4, 32, 128, 512, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "cases": [],
        "command": f"python bench/packed_linear.py --repeats {args.repeats}",
    }
    for name, (rows_out, width) in WEIGHTS.items():
        weight = torch.randn(rows_out, width) / width**0.5
        packed = pack(weight, choose=lambda weight, blocked: (True, True, True))  # every size, whichever is faster
        assert packed is not None, "this torch has no oneDNN"
        for rows in ROWS:
            x, out = torch.randn(rows, width), torch.empty(rows, rows_out)
            paths = {
                "f_linear": lambda x=x, weight=weight: torch.nn.functional.linear(x, weight),
                "packed": lambda x=x, weight=weight, packed=packed: linear(x, weight, None, packed),
            }
            if "head" in name:
                paths["blocked"] = lambda out=out, x=x, weight=weight: logits_into(out, x, weight)
            inner = max(1, int(2e8 // (rows * rows_out * width)))  # calls per timing: about 0.4 GFLOP
            times = {path: [] for path in paths}
            for _ in range(args.repeats + 1):  # the first round warms up
                for path, fn in paths.items():
                    start = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    times[path].append((time.perf_counter() - start) / inner)
            case = {"weight": name, "rows": rows, **{f"{p}_s": statistics.median(t[1:]) for p, t in times.items()}}
            for path in paths:
                if path != "f_linear":
                    case[f"{path}_speedup"] = case["f_linear_s"] / case[f"{path}_s"]
            results["cases"].append(case)
            log(
                f"{name:27s} {rows:5d} rows: F.linear {1e3 * case['f_linear_s']:8.2f} ms, packed "
                f"{case['packed_speedup']:.2f}x"
                + (f", blocked {case['blocked_speedup']:.2f}x" if "blocked" in paths else "")
            )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "packed_linear.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    log(f"results: {path}")


if __name__ == "__main__":
    main()
