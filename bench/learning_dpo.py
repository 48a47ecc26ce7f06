"""Does DPO learn? Held-out accuracy on the offline arithmetic task before and after DPO on the
embedded SmolLM2-135M, pairs built every epoch from the run's own samples (the rejection buffer),
within a fixed wall-time budget.

    python bench/learning_dpo.py [--minutes 11] [--server-threads 1] [--data-dir data/bench-dpo]

Starts `eztinker server --model smollm2-135m` (as `eztinker demo` does), runs `eztinker dpo`'s
`main` with the schedule below and `time_budget_minutes`, and writes
bench/results/learning_dpo.json: the command, the machine and its load average before and after,
the config, accuracy before and after (greedy, 200 held-out problems), every epoch's metrics and
the wall time of the whole command (server start included). The budget (from the recipe's start,
the first evaluation included) decides whether another epoch fits, by the previous epoch's
duration; the test problems are scored before training and after the last epoch only, so the
budget goes to training, and that final evaluation runs after the budget.

`--server-threads` sets the server's OMP_NUM_THREADS: on a 2-core machine that other jobs share,
torch's default of one thread per core collapses (measured side by side on 2026-12-02 at a load
average of 7: 8 prompts x 4 candidates took 223 s with 2 threads and 35 s with 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from run import RESULTS_DIR, log, machine

from eztinker.launcher import ServerProcess, offline_env
from eztinker.recipes.dpo import Config, main

# The demo's sampling schedule (64 problems x 4 candidates, 64 new tokens, 200 test problems),
# with DPO's own knobs; epochs is a ceiling, the time budget decides how many run.
SCHEDULE = dict(task="arithmetic", max_samples=64, num_candidates=4, temperature=0.8, max_tokens=64, eval_size=200,
                epochs=20, eval_every=1000, learning_rate=1e-3, lr_decay=0.8, beta=0.1, batch_size=4,
                micro_batch_size=4, checkpoint=True, seed=0)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=11.0, help="The recipe's time budget.")
    parser.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server.")
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench-dpo"))
    parser.add_argument("--max-samples", type=int, default=SCHEDULE["max_samples"])
    parser.add_argument("--eval-size", type=int, default=SCHEDULE["eval_size"])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "learning_dpo.json")
    args = parser.parse_args()
    started, load_before = time.monotonic(), os.getloadavg()
    log(f"load average before: {load_before}; starting the server on smollm2-135m ...")
    with ServerProcess(model="smollm2-135m", data_dir=args.data_dir / "server", log_file=args.data_dir / "server.log",
                       env={**offline_env(), "OMP_NUM_THREADS": str(args.server_threads)}) as server:
        config = Config(**{**SCHEDULE, "max_samples": args.max_samples, "eval_size": args.eval_size},
                        server_url=server.url, time_budget_minutes=args.minutes, output_dir=args.data_dir)
        results = main(config)
    epochs = results["epochs"]
    before, after = epochs[0], epochs[-1]
    summary = {
        "what": "DPO on buffer pairs (best correct vs likeliest incorrect candidate per problem, resampled every epoch), "
                "SmolLM2-135M-Instruct, offline arithmetic task, greedy held-out accuracy",
        "command": "python " + shlex.join(["bench/learning_dpo.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "time_budget_minutes": args.minutes,
        "server_threads": args.server_threads,
        "wall_seconds": round(time.monotonic() - started, 1),
        "recipe_seconds": round(results["total_seconds"], 1),
        "test_problems": args.eval_size,
        "before": {k: before[k] for k in ("test_accuracy", "test_strict_accuracy", "test_lenient_accuracy")},
        "after": {k: after.get(k) for k in ("test_accuracy", "test_strict_accuracy", "test_lenient_accuracy")},
        "epochs_run": len(epochs) - 1,
        "best_epoch": results.get("best_epoch"),
        "stopped": results.get("stopped"),
        "config": results["config"],
        "epochs": epochs,
    }
    args.results.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"before {before['test_accuracy']:.1%} -> after {after.get('test_accuracy', float('nan')):.1%} "
        f"(lenient {before['test_lenient_accuracy']:.1%} -> {after.get('test_lenient_accuracy', float('nan')):.1%}) "
        f"in {summary['wall_seconds']:.0f} s; {args.results}")


if __name__ == "__main__":
    run()
