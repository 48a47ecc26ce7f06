"""The learning runs side by side in one picture: for each `bench/results/learning_<name>.json`,
the accuracy of the replies it trained on (sampled at the recipe's temperature: per epoch for
rejection SFT and DPO, per step for RL) and its greedy held-out accuracy before and after, against
wall time and against optimizer steps.

    python bench/plot_learning.py rsft_pair1 rl_pair1 [...] --out docs/learning.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def curve(result: dict) -> tuple[list[float], list[int], list[float]]:
    """Minutes from the recipe's start, optimizer steps so far, and train accuracy, per point."""
    first_eval = sum(result["epochs"][0]["seconds"].values())
    minutes, steps, accuracy = [], [], []
    elapsed, done = first_eval, 0
    if result["recipe"] == "rl":
        points = [(s["seconds"], s["optimizer_steps"], s["train_accuracy"]) for s in result["steps"]]
    else:
        points = [
            (sum(e["seconds"].values()), e["optimizer_steps"], e["train_accuracy"])
            for e in result["epochs"][1:]
            if "train_accuracy" in e
        ]
    for seconds, optimizer_steps, train_accuracy in points:
        elapsed, done = elapsed + seconds, done + optimizer_steps
        minutes.append(elapsed / 60)
        steps.append(done)
        accuracy.append(train_accuracy)
    return minutes, steps, accuracy


def plot(names: list[str], out: Path) -> None:
    fig, (by_time, by_steps) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name in names:
        result = json.loads((RESULTS_DIR / f"learning_{name}.json").read_text())
        minutes, steps, accuracy = curve(result)
        before, after = result["before"]["test_accuracy"], result["after"]["test_accuracy"]
        label = f"{name}: held-out {before:.1%} -> {after:.1%}"
        (line,) = by_time.plot(minutes, accuracy, marker=".", label=label)
        by_steps.plot(steps, accuracy, marker=".", color=line.get_color())
        end = result["recipe_seconds"] / 60
        for axis, x_end in ((by_time, end), (by_steps, steps[-1] if steps else 0)):
            axis.plot([0, x_end], [before, after], "*", markersize=12, color=line.get_color())
    by_time.set(xlabel="minutes from the recipe's start", ylabel="accuracy")
    by_steps.set(xlabel="optimizer steps")
    by_time.set_title("lines: train replies (sampled); stars: greedy held-out before and after", fontsize=9)
    for axis in (by_time, by_steps):
        axis.grid(alpha=0.3)
        axis.set_ylim(0, 1)
    by_time.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="learning_<name>.json in bench/results/")
    parser.add_argument("--out", type=Path, default=Path("docs/learning.png"))
    args = parser.parse_args()
    plot(args.names, args.out)


if __name__ == "__main__":
    main()
