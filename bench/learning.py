"""Does it learn? Held-out accuracy on the offline arithmetic task before and after one recipe
(rejection SFT, RL or DPO) on the embedded SmolLM2-135M, within a fixed wall-time budget.

    python bench/learning.py --recipe rsft|rl|dpo [--minutes 15] [--server-threads 2]
        [--set groups_per_step=32 --set normalize_std=false ...] [--tag NAME]

`--set` overrides one field of the recipe's Config (its schedule below; the value is parsed as
JSON, else taken as a string), and `--tag` names the result file (learning_<recipe>_<tag>.json),
so a sweep's runs sit side by side.

Starts `eztinker server --model smollm2-135m` (as `eztinker demo` does), runs the recipe's
`main` with the schedule below and `time_budget_minutes`, and writes
bench/results/learning_<recipe>.json: the command, the machine and its load average before and
after, the config, accuracy before and after (greedy, 200 held-out problems, the same for every
recipe), every epoch's metrics and the wall time. The budget runs from the recipe's start, the
first evaluation included; work (an epoch, or an RL step) starts only if it is expected to end
inside it, judged by the previous one. The test problems are scored before training and after
the last epoch only, so the budget goes to training; that final evaluation runs after the budget.

`--server-threads` sets the server's OMP_NUM_THREADS: on a 2-core machine that other jobs share,
torch's default of one thread per core collapses (measured side by side on 2026-12-02 at a load
average of 7: 8 prompts x 4 candidates took 223 s with 2 threads and 35 s with 1); on a quiet
machine 2 threads are faster.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from run import RESULTS_DIR, log, machine

from eztinker.launcher import ServerProcess, offline_env

# Shared by every recipe: the task, the held-out set, the seed; epochs is a ceiling (the time
# budget decides how many run) and only the final adapter is scored.
COMMON = dict(task="arithmetic", eval_size=200, max_tokens=64, epochs=50, eval_every=1000, checkpoint=True, seed=0)
SCHEDULES = {
    # The demo's schedule: 64 problems x 4 candidates, the best correct one trained on.
    "rsft": (
        "eztinker.recipes.rejection_sft",
        dict(max_samples=64, num_candidates=4, temperature=0.8, learning_rate=1e-3, lr_decay=0.7, batch_size=8),
    ),
    # `eztinker rl`'s defaults: 256 problems, 32 groups of 4 a step, each step 4 optimizer steps.
    "rl": ("eztinker.recipes.rl", dict()),
    # `eztinker dpo`'s defaults (buffer pairs, per-token log-ratios, beta 2, an SFT term on the
    # chosen reply), with the demo's learning-rate decay of 0.7 an epoch.
    "dpo": ("eztinker.recipes.dpo", dict(lr_decay=0.7)),
}
WHAT = {
    "rsft": "rejection-sampling SFT (train on the best correct of 4 candidates per problem, resampled every epoch)",
    "rl": "GRPO-style RL (eztinker rl's defaults: groups of 4, group-centred advantages, importance_sampling loss)",
    "dpo": "DPO on buffer pairs (best correct vs likeliest incorrect candidate per problem, resampled every epoch)",
}


def overrides(pairs: list[str]) -> dict[str, object]:
    """`--set a=1 --set b=false` as {"a": 1, "b": False}; a value that is not JSON stays a string."""
    fields = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes FIELD=VALUE, got {pair!r}")
        try:
            fields[key] = json.loads(text)
        except json.JSONDecodeError:
            fields[key] = text
    return fields


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(SCHEDULES), required=True)
    parser.add_argument("--minutes", type=float, default=15.0, help="The recipe's time budget.")
    parser.add_argument("--server-threads", type=int, default=2, help="OMP_NUM_THREADS of the server.")
    parser.add_argument("--data-dir", type=Path, default=None, help="Default: data/bench-learning-<recipe>.")
    parser.add_argument("--eval-size", type=int, default=COMMON["eval_size"])
    parser.add_argument("--results", type=Path, default=None, help="Default: bench/results/learning_<recipe>.json.")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="Override a Config field.")
    parser.add_argument("--tag", default=None, help="Suffix of the result file and the data directory.")
    args = parser.parse_args()
    module_name, schedule = SCHEDULES[args.recipe]
    schedule = {**schedule, **overrides(args.set)}
    name = f"{args.recipe}_{args.tag}" if args.tag else args.recipe
    recipe = importlib.import_module(module_name)
    args.data_dir = args.data_dir or Path(f"data/bench-learning-{name}")
    args.results = args.results or RESULTS_DIR / f"learning_{name}.json"
    started, load_before = time.monotonic(), os.getloadavg()
    log(f"load average before: {load_before}; starting the server on smollm2-135m ...")
    with ServerProcess(
        model="smollm2-135m",
        data_dir=args.data_dir / "server",
        log_file=args.data_dir / "server.log",
        env={**offline_env(), "OMP_NUM_THREADS": str(args.server_threads)},
    ) as server:
        config = recipe.Config(
            **{**COMMON, **schedule, "eval_size": args.eval_size},
            server_url=server.url,
            time_budget_minutes=args.minutes,
            output_dir=args.data_dir,
        )
        results = recipe.main(config)
    epochs = results["epochs"]
    before, after = epochs[0], epochs[-1]
    summary = {
        "recipe": args.recipe,
        "what": WHAT[args.recipe] + ", SmolLM2-135M-Instruct, offline arithmetic task, greedy held-out accuracy",
        "command": "python " + shlex.join(["bench/learning.py", *sys.argv[1:]]),
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
        "optimizer_steps": sum(e.get("optimizer_steps", 0) or 0 for e in epochs),
        "best_epoch": results.get("best_epoch"),
        "stopped": results.get("stopped"),
        "config": results["config"],
        "epochs": epochs,
        "steps": results.get("steps", []),
    }
    args.results.write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"before {before['test_accuracy']:.1%} -> after {after.get('test_accuracy', float('nan')):.1%} "
        f"(lenient {before['test_lenient_accuracy']:.1%} -> {after.get('test_lenient_accuracy', float('nan')):.1%}) "
        f"in {summary['wall_seconds']:.0f} s; {args.results}"
    )


if __name__ == "__main__":
    run()
