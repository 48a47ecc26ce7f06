"""How long one tinker-cookbook supervised step takes against `eztinker server`, unmodified
cookbook, through the official SDK.

    python bench/cookbook_step.py [--model tiny|smollm2] [--steps 6] [--batch-size 8]

Starts `eztinker server` on the model, runs `tinker_cookbook.supervised.train.main` on generated
arithmetic conversations (local JSONL; renderer qwen3_instruct, ChatML, which both models use),
and reports the wall time of a step: the loop runs twice on one server, for N and for 2N steps,
and a step is (T(2N) - T(N)) / N, which leaves out the set-up both runs share (session, run
creation, the final checkpoint). Results: bench/results/cookbook_step_<model>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from run import RESULTS_DIR, log, machine, tiny_model_dir

from eztinker.launcher import ServerProcess, offline_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench-cookbook"))
    args = parser.parse_args()
    os.environ.update(TINKER_TELEMETRY="0", HF_HUB_OFFLINE="1", TINKER_API_KEY="tml-bench")
    import tinker_cookbook.utils.cost_estimation as cost_estimation
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
    from tinker_cookbook.tokenizer_utils import register_tokenizer
    from transformers import AutoTokenizer

    cost_estimation._pricing_fetched = True  # its price list is on the internet
    model = str(tiny_model_dir("tiny")) if args.model == "tiny" else "smollm2-135m"
    work = Path(tempfile.mkdtemp(prefix="eztinker-cookbook-"))
    data = work / "sl.jsonl"
    with data.open("w") as f:
        for i in range(args.batch_size * args.steps * 2):
            a, b = 2 + i % 17, 3 + (i * 7) % 13
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {a} + {b}?"},
                            {"role": "assistant", "content": f"{a} + {b} = {a + b}. Answer: {a + b}"},
                        ]
                    }
                )
                + "\n"
            )
    with ServerProcess(
        model=model,
        data_dir=args.data_dir,
        log_file=work / "server.log",
        extra_args=["--device", "cpu"],
        env=offline_env(),
    ) as server:
        os.environ["TINKER_BASE_URL"] = server.url
        if args.model == "smollm2":  # the cookbook loads tokenizers by name: point it at the server's copy
            folder = args.data_dir / "cache" / "models" / "smollm2-135m-instruct"
            register_tokenizer(model, lambda: AutoTokenizer.from_pretrained(folder))
        walls = {}
        for steps in (args.steps, 2 * args.steps):
            config = train.Config(
                log_path=str(work / f"run{steps}"),
                model_name=model,
                recipe_name="bench",
                renderer_name="qwen3_instruct",
                dataset_builder=FromConversationFileBuilder(
                    file_path=str(data),
                    common_config=ChatDatasetBuilderCommonConfig(
                        model_name_for_tokenizer=model,
                        renderer_name="qwen3_instruct",
                        max_length=256,
                        batch_size=args.batch_size,
                    ),
                ),
                learning_rate=1e-3,
                lora_rank=args.lora_rank,
                num_epochs=1,
                max_steps=steps,
                save_every=0,
                eval_every=0,
                infrequent_eval_every=0,
            )
            start = time.perf_counter()
            asyncio.run(train.main(config))
            walls[steps] = time.perf_counter() - start
    metrics = [json.loads(line) for line in (work / f"run{2 * args.steps}" / "metrics.jsonl").read_text().splitlines()]
    step = (walls[2 * args.steps] - walls[args.steps]) / args.steps
    results = {
        "model": args.model,
        "batch_size": args.batch_size,
        "lora_rank": args.lora_rank,
        "wall_seconds": {str(k): v for k, v in walls.items()},
        "step_seconds": step,
        "tokens_per_step": statistics.mean(m["num_tokens"] for m in metrics if "num_tokens" in m),
        "train_mean_nll": [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m],
        # The cookbook's own data preparation (rendering conversations into datums), client-side.
        "cookbook_get_batch_seconds": statistics.median(m["time/get_batch"] for m in metrics),
        "machine": machine(),
    }
    log(
        f"cookbook SL step on {args.model} (batch {args.batch_size}, ~{results['tokens_per_step']:.0f} tokens, "
        f"rank {args.lora_rank}): {step:.2f} s a step ({walls[args.steps]:.1f} s for {args.steps} steps, "
        f"{walls[2 * args.steps]:.1f} s for {2 * args.steps}); of it the cookbook's own get_batch "
        f"{results['cookbook_get_batch_seconds']:.2f} s"
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"cookbook_step_{args.model}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
