"""The pipelined RL loop against the sequential one, side by side on one server.

    python bench/pipelined_rl.py [--model tiny|smollm2] [--task arithmetic|gsm8k] [--steps 8] [--repeats 2]

Runs `eztinker rl`'s `main` for the same steps (groups of 4, 8 problems per step, no evaluation)
with `--max-staleness 0` (sample, score, train, wait: the server idles while this side scores
and builds the batch) and `--max-staleness 1` (the next step's sampling is queued behind the
current update), alternating the two `--repeats` times, and writes
bench/results/pipelined_rl_<model>_<task>.json: each run's wall time per step, the time spent
waiting for samples, and the ratio sequential / pipelined of the medians. The gain is the time
this side spends between a step's samples landing and its training being queued: scoring (Math-
Verify on GSM8K is much slower than the arithmetic check) and round trips.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from run import RESULTS_DIR, log, machine, tiny_model_dir

from eztinker.launcher import ServerProcess, offline_env
from eztinker.recipes.rl import Config, main
from eztinker.tasks.gsm8k import find_shared_gsm8k_dir


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--task", choices=("arithmetic", "gsm8k"), default="arithmetic")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench-pipelined-rl"))
    args = parser.parse_args()
    model = str(tiny_model_dir("tiny")) if args.model == "tiny" else "smollm2-135m"
    gsm8k_dir = find_shared_gsm8k_dir() if args.task == "gsm8k" else None
    load_before = os.getloadavg()
    runs: dict[int, list[dict]] = {0: [], 1: []}
    with ServerProcess(
        model=model, data_dir=args.data_dir / "server", log_file=args.data_dir / "server.log", env=offline_env()
    ) as server:
        for repeat in range(args.repeats):
            for staleness in (0, 1):
                config = Config(
                    task=args.task,
                    gsm8k_dir=gsm8k_dir,
                    server_url=server.url,
                    max_samples=8 * args.steps,
                    num_candidates=4,
                    groups_per_step=8,
                    epochs=1,
                    eval_size=0,
                    max_tokens=args.max_tokens,
                    max_staleness=staleness,
                    seed=repeat,
                    output_dir=args.data_dir / f"s{staleness}-r{repeat}",
                )
                started = time.monotonic()
                results = main(config)
                wall = time.monotonic() - started
                waited = results["epochs"][-1]["seconds"]["wait_for_samples"]
                runs[staleness].append(
                    {
                        "repeat": repeat,
                        "wall_seconds": round(wall, 2),
                        "steps": len(results["steps"]),
                        "seconds_per_step": round(wall / len(results["steps"]), 3),
                        "waiting_for_samples": round(waited, 2),
                    }
                )
                log(
                    f"max_staleness {staleness}, repeat {repeat}: {wall:.1f} s for {len(results['steps'])} steps "
                    f"({waited:.1f} s waiting for samples)"
                )
    median = {s: statistics.median(r["seconds_per_step"] for r in rs) for s, rs in runs.items()}
    summary = {
        "command": "python " + shlex.join(["bench/pipelined_rl.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "model": args.model,
        "task": args.task,
        "steps": args.steps,
        "groups_per_step": 8,
        "group_size": 4,
        "max_tokens": args.max_tokens,
        "sequential": runs[0],
        "pipelined": runs[1],
        "median_seconds_per_step": {"sequential": median[0], "pipelined": median[1]},
        "speedup": round(median[0] / median[1], 3),
    }
    path = RESULTS_DIR / f"pipelined_rl_{args.model}_{args.task}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"sequential {median[0]:.2f} s/step, pipelined {median[1]:.2f} s/step: {summary['speedup']:.2f}x; {path}")


if __name__ == "__main__":
    run()
