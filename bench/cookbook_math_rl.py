"""The cookbook's own RL on the same kind of task: tinker-cookbook 0.6.1's `math_rl` recipe with its
arithmetic environment, unmodified, through the Tinker API against `eztinker server` on the
embedded SmolLM2-135M-Instruct, for a wall-time budget; held-out accuracy before and after.

    python bench/cookbook_math_rl.py [--loss-fn stable_reinforce|importance_sampling] [--minutes 15]
        [--eval-problems 200] [--set learning_rate=1e-4 ...] [--tag NAME]

The server presents SmolLM2 under a name from the cookbook's model table
(`--model Qwen/Qwen3-4B-Instruct-2507=<folder>`), so the recipe picks its renderer (qwen3_instruct,
ChatML like SmolLM2's own template) by name, and the cookbook's `register_tokenizer` maps the name
to the folder's tokenizer. The recipe's config keeps its defaults (LoRA rank 32, 100 groups of 4 a
step, lr 1e-5, 5 new tokens, temperature 1, the loss named) except base_url, log_path, model_name,
`save_every=1` (so the adapter at the deadline is on disk) and `eval_every=0` (the held-out
evaluation below runs outside the budget). The recipe runs in a child process, killed at the
deadline. `--set` changes one more field of the recipe's CLIConfig (as bench/learning.py's does),
and the result names it.

Held-out accuracy: the environment's own problems ("What is x + y?", x, y in 0..100, its few-shot
prefix) from batch index 10,000 of its dataset (training draws batch indices 0-99), one greedy reply
each (5 tokens), graded by the environment (`env/all/correct`), for the base model and for the last
sampler checkpoint. Training problems are random draws too, so some held-out problems may also have
been trained on (10,201 possible problems; 100 a step).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from learning import overrides
from run import RESULTS_DIR, log, machine

from eztinker.engine.models import _embedded_model_dir
from eztinker.launcher import ServerProcess, offline_env

MODEL = "Qwen/Qwen3-4B-Instruct-2507"  # a name from the cookbook's model table
HELD_OUT_INDEX = 10_000


async def held_out_accuracy(base_url: str, problems: int, *, model_path: str | None) -> dict[str, float]:
    """The environment's metrics over `problems` held-out problems, one greedy reply each."""
    import tinker
    from tinker_cookbook import renderers
    from tinker_cookbook.completers import TinkerTokenCompleter
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDataset
    from tinker_cookbook.rl.metric_util import RLTestSetEvaluator
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    renderer = renderers.get_renderer("qwen3_instruct", tokenizer=get_tokenizer(MODEL))
    dataset = ArithmeticDataset(batch_size=problems, renderer=renderer, group_size=1, n_batches=1)
    dataset.get_batch = lambda index, get=dataset.get_batch: get(HELD_OUT_INDEX)  # type: ignore[method-assign]
    service = tinker.ServiceClient(base_url=base_url)
    if model_path is None:
        client = await service.create_sampling_client_async(base_model=MODEL)
    else:
        client = await service.create_sampling_client_async(model_path=model_path)
    evaluator = RLTestSetEvaluator(dataset, max_tokens=5)
    metrics = await evaluator.eval_token_completer(TinkerTokenCompleter(client, max_tokens=5, temperature=0.0))
    return {k.removeprefix("test/"): v for k, v in metrics.items() if "correct" in k or "format" in k}


def train(config, minutes: float, folder: Path) -> str | None:
    """The recipe in a child process, stopped at the deadline. Cancelling it in this process would
    leave the SDK's ServiceClient waiting on close for requests the cancellation orphaned (seen:
    the bench hung there)."""
    child = multiprocessing.get_context("spawn").Process(target=_train_child, args=(config, folder))
    child.start()
    child.join(minutes * 60)
    if child.is_alive():
        child.kill()
        child.join()
        return f"stopped at the {minutes}-minute deadline"
    return None if child.exitcode == 0 else f"the recipe exited with status {child.exitcode}"


def _train_child(config, folder: Path) -> None:
    from tinker_cookbook.recipes.math_rl import train as math_rl

    offline_cookbook(folder)
    asyncio.run(math_rl.cli_main(config))


def offline_cookbook(folder: Path) -> None:
    """The cookbook without the internet: no telemetry or price list, and MODEL's tokenizer from `folder`."""
    import tinker_cookbook.utils.cost_estimation as cost_estimation
    from tinker_cookbook import tokenizer_utils
    from transformers import AutoTokenizer

    os.environ.update(TINKER_API_KEY="tml-bench", TINKER_TELEMETRY="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cost_estimation._pricing_fetched = True  # its price list is on the internet
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer_utils.register_tokenizer(MODEL, lambda: tokenizer)


def last_sampler_path(log_path: Path) -> tuple[str | None, int]:
    file = log_path / "checkpoints.jsonl"
    lines = file.read_text().splitlines() if file.exists() else []  # none yet: cancelled before step 1 ended
    rows = [r for r in map(json.loads, filter(str.strip, lines)) if r.get("sampler_path")]
    return (rows[-1]["sampler_path"], len(rows)) if rows else (None, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss-fn", default="stable_reinforce", choices=["stable_reinforce", "importance_sampling"])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="Change a CLIConfig field.")
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()
    changed = overrides(args.set)
    name = f"cookbook_math_rl_{args.tag or args.loss_fn}"
    work = Path("data") / f"bench-{name}"
    folder = _embedded_model_dir(Path("data") / "bench-cache")

    import chz  # noqa: F401  (the cookbook's config library; fails early if the cookbook is missing)
    from tinker_cookbook.recipes.math_rl import train as math_rl

    offline_cookbook(folder)

    started, load_before = time.monotonic(), os.getloadavg()
    log(f"load average before: {load_before}; starting the server ...")
    with ServerProcess(
        model=f"{MODEL}={folder}",
        data_dir=work / "server",
        log_file=work / "server.log",
        env={**offline_env(), "OMP_NUM_THREADS": str(args.server_threads)},
        startup_timeout=300,
    ) as server:
        before = asyncio.run(held_out_accuracy(server.url, args.eval_problems, model_path=None))
        log(f"held-out before: {before}")
        config = math_rl.CLIConfig(
            model_name=MODEL,
            base_url=server.url,
            log_path=str(work / "run"),
            loss_fn=args.loss_fn,
            save_every=1,
            eval_every=0,
            behavior_if_log_dir_exists="delete",
            **changed,
        )
        train_started = time.monotonic()
        stopped = train(config, args.minutes, folder)
        train_seconds = time.monotonic() - train_started
        path, saved = last_sampler_path(work / "run")
        after = asyncio.run(held_out_accuracy(server.url, args.eval_problems, model_path=path)) if path else {}
        log(f"held-out after ({saved} steps saved): {after}")
    metrics = work / "run" / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    summary = {
        "what": "tinker-cookbook 0.6.1 math_rl (arithmetic environment, its defaults) through the Tinker API, "
        "SmolLM2-135M-Instruct served as " + MODEL,
        "command": "python " + shlex.join(["bench/cookbook_math_rl.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "loss_fn": args.loss_fn,
        "changed_from_defaults": changed,
        "time_budget_minutes": args.minutes,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.monotonic() - started, 1),
        "stopped": stopped,
        "steps_saved": saved,
        "held_out_problems": args.eval_problems,
        "before": before,
        "after": after,
        "steps": [
            {k: m.get(k) for k in ("step", "env/all/correct", "env/all/format", "env/all/reward/total", "grad_norm")}
            for m in steps
            if "env/all/correct" in m
        ],
    }
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"{args.loss_fn}: held-out correct {before.get('env/all/correct')} -> {after.get('env/all/correct')}; {out}")


if __name__ == "__main__":
    main()
