"""A small grid of `bench/learning.py` runs: every combination of the values given, `--parallel`
at a time (each with its own server on `--server-threads` threads), then one table of held-out
accuracy before and after.

    python bench/learning_sweep.py --recipe rl --grid substeps=4,8 --grid learning_rate=1e-3,2e-3 \
        [--seeds 0,1] [--minutes 15] [--parallel 2] [--name NAME]

The budget it states before it starts: ceil(runs / parallel) x (minutes + about 4 for the server's
start and the final evaluation). Each run writes bench/results/learning_<recipe>_<name>_<k>.json
(its curve, as learning.py writes it); the sweep writes bench/results/sweep_<recipe>_<name>.json:
the command, the grid, and per run its settings, accuracy before and after, optimizer steps and
result file, sorted best first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

from run import RESULTS_DIR, log

HERE = Path(__file__).resolve().parent
MINUTES_AROUND_A_RUN = 4  # the server's start and the final evaluation, outside the recipe's budget


def grid(pairs: list[str]) -> list[dict[str, str]]:
    """`["a=1,2", "b=x"]` as [{"a": "1", "b": "x"}, {"a": "2", "b": "x"}]."""
    axes = []
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"--grid takes FIELD=V1,V2,..., got {pair!r}")
        axes.append([(key, value) for value in values.split(",")])
    return [dict(combination) for combination in itertools.product(*axes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["rsft", "rl", "dpo"], required=True)
    parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2", help="One axis of the grid.")
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds: every point runs once per seed.")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--name", default="sweep")
    args = parser.parse_args()
    points = [{**point, "seed": seed} for point in grid(args.grid) for seed in args.seeds.split(",")]
    rounds = math.ceil(len(points) / args.parallel)
    log(
        f"{len(points)} runs, {args.parallel} at a time: about {rounds * (args.minutes + MINUTES_AROUND_A_RUN):.0f} min"
    )
    runs = []
    for k, point in enumerate(points):
        tag = f"{args.name}_{k}"
        command = [
            sys.executable,
            str(HERE / "learning.py"),
            f"--recipe={args.recipe}",
            f"--minutes={args.minutes}",
            f"--server-threads={args.server_threads}",
            f"--eval-size={args.eval_size}",
            f"--tag={tag}",
            *(f"--set={key}={value}" for key, value in point.items()),
        ]
        runs.append({"settings": point, "tag": tag, "command": command})
    pending, running = list(runs), []
    while pending or running:
        while pending and len(running) < args.parallel:
            run = pending.pop(0)
            log_file = HERE.parent / "data" / f"sweep-{run['tag']}.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            # From the project root, so that learning.py's data/ folders land where they do when run by hand.
            run["process"] = subprocess.Popen(
                run["command"], cwd=HERE.parent, stdout=log_file.open("w"), stderr=subprocess.STDOUT
            )
            log(f"started {run['tag']}: {run['settings']}")
            running.append(run)
        time.sleep(5)
        for run in [r for r in running if r["process"].poll() is not None]:
            running.remove(run)
            log(f"{run['tag']} ended with exit code {run['process'].returncode}")
    rows = []
    for run in runs:
        path = RESULTS_DIR / f"learning_{args.recipe}_{run['tag']}.json"
        row = {"settings": run["settings"], "results": path.name, "exit_code": run["process"].returncode}
        if path.exists():
            result = json.loads(path.read_text())
            row |= {
                "before": result["before"]["test_accuracy"],
                "after": result["after"].get("test_accuracy"),
                "optimizer_steps": result["optimizer_steps"],
                "load_average_after": result["load_average_after"],
            }
        rows.append(row)
    rows.sort(key=lambda r: -(r.get("after") or -1))
    summary = {
        "recipe": args.recipe,
        "command": "python " + shlex.join(["bench/learning_sweep.py", *sys.argv[1:]]),
        "grid": args.grid,
        "seeds": args.seeds,
        "minutes": args.minutes,
        "parallel": args.parallel,
        "server_threads": args.server_threads,
        "runs": rows,
    }
    out = RESULTS_DIR / f"sweep_{args.recipe}_{args.name}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for row in rows:
        after = row.get("after")
        log(f"{row['settings']}: {row.get('before', float('nan')):.1%} -> {after if after is None else f'{after:.1%}'}")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
