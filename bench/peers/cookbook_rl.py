"""A few steps of tinker-cookbook's RL loop (`rl.train.main`, unmodified) against one running
Tinker server: the workload's last phase (bench/peers/workload.py runs it against each server).

    $PEERS_DIR/cookbook-venv/bin/python bench/peers/cookbook_rl.py --base-url URL --model NAME --out F.json

The cookbook is 0.4.3 on tinker 0.25.0 (setup_skyrl.sh's cookbook-venv): the newest cookbook whose
SDK requirement (>= 0.22.3) SkyRL's SDK 0.25 meets; 0.5 and 0.6 need >= 0.34, whose `sample()`
fails against SkyRL 0.4.0. The problem: sums of two numbers from 2 to 20 asked as a chat, the
reward 1 where the reply's last number is the sum (no format term), groups of `--group-size`
replies to `--groups` problems a step, at most `--max-tokens` tokens, temperature 1, the
`importance_sampling` loss, LoRA rank 8 (the workload's), no checkpoints or evaluations between
steps. A step's time is the cookbook's own `time/total`; each step's reward and the KL between the
sampler's and the trainer's logprobs of the same tokens (0 when both hold the same weights) are
recorded beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import chz
from tinker_cookbook import renderers
from tinker_cookbook.rl import train
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder
from tinker_cookbook.tokenizer_utils import get_tokenizer

RENDERER = "qwen3_instruct"  # ChatML without <think>, as SmolLM2's template (not in the cookbook's model table)
LORA_RANK = 8


class SumEnv(ProblemEnv):
    def __init__(self, renderer, a: int, b: int):
        super().__init__(renderer, format_coef=0.0)
        self.a, self.b = a, b

    def get_question(self) -> str:
        return f"What is {self.a} + {self.b}? Reply with the number only."

    def check_answer(self, sample_str: str) -> bool:
        numbers = re.findall(r"-?\d+", sample_str.replace(",", ""))
        return bool(numbers) and int(numbers[-1]) == self.a + self.b

    def check_format(self, sample_str: str) -> bool:
        return True

    def get_reference_answer(self) -> str:
        return str(self.a + self.b)


class SumDataset(RLDataset):
    def __init__(self, problems: list[tuple[int, int]], groups: int, group_size: int, model: str):
        self.problems, self.groups, self.group_size = problems, groups, group_size
        self.renderer = renderers.get_renderer(RENDERER, get_tokenizer(model))

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        batch = self.problems[index * self.groups : (index + 1) * self.groups]
        return [
            ProblemGroupBuilder(
                env_thunk=lambda a=a, b=b: SumEnv(self.renderer, a, b), num_envs=self.group_size, dataset_name="sums"
            )
            for a, b in batch
        ]

    def __len__(self) -> int:
        return len(self.problems) // self.groups


@chz.chz
class SumDatasetBuilder(RLDatasetBuilder):
    steps: int
    groups: int
    group_size: int
    model: str

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        rng = random.Random(0)  # the same problems for every server
        problems = [(rng.randint(2, 20), rng.randint(2, 20)) for _ in range(self.steps * self.groups)]
        return SumDataset(problems, self.groups, self.group_size, self.model), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True, help="the server's model name; also a folder holding its tokenizer")
    parser.add_argument("--out", type=Path, required=True, help="the results' JSON file")
    parser.add_argument("--log-path", type=Path, help="the cookbook's log folder (default: beside --out)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--groups", type=int, default=4, help="problems a step")
    parser.add_argument("--group-size", type=int, default=4, help="replies a problem")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    os.environ.setdefault("TINKER_API_KEY", "tml-peers-bench")
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    log_path = args.log_path or args.out.with_suffix("")
    config = train.Config(
        learning_rate=1e-4,
        model_name=args.model,
        recipe_name="peers_sums_rl",
        renderer_name=RENDERER,
        max_tokens=args.max_tokens,
        log_path=str(log_path),
        lora_rank=LORA_RANK,
        max_steps=args.steps,
        save_every=0,
        eval_every=0,
        base_url=args.base_url,
        loss_fn="importance_sampling",
        dataset_builder=SumDatasetBuilder(
            steps=args.steps, groups=args.groups, group_size=args.group_size, model=args.model
        ),
    )
    asyncio.run(train.main(config))
    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [row for row in rows if "env/all/reward/total" in row]
    if len(steps) != args.steps:
        raise SystemExit(f"the cookbook logged {len(steps)} steps of {args.steps}: see {log_path}")
    args.out.write_text(
        json.dumps(
            {
                "step_seconds": [row["time/total"] for row in steps],
                "reward": [row["env/all/reward/total"] for row in steps],
                "kl_sample_train": [row.get("optim/kl_sample_train_v1") for row in steps],
                "config": {
                    "steps": args.steps,
                    "groups": args.groups,
                    "group_size": args.group_size,
                    "max_tokens": args.max_tokens,
                    "lora_rank": LORA_RANK,
                    "renderer": RENDERER,
                },
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
