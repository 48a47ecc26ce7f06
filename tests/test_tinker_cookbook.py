"""tinker-cookbook 0.6.1's own supervised and RL training loops (`supervised.train.main`,
`rl.train.main`), unmodified, for a few steps against a real `eztinker server` on the tiny Qwen2,
with dataset builders over local files (as a user without the Hub would write them)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest

pytest.importorskip("tinker_cookbook", reason="needs tinker-cookbook (scripts/setup.sh installs it)")
import chz  # noqa: E402
from recipe_runs import offline_cookbook, recipe_server, rows  # noqa: E402
from tinker_cookbook import renderers  # noqa: E402
from tinker_cookbook.rl import train as rl_train  # noqa: E402
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder  # noqa: E402
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder  # noqa: E402
from tinker_cookbook.supervised import train as sl_train  # noqa: E402
from tinker_cookbook.supervised.data import FromConversationFileBuilder  # noqa: E402
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig  # noqa: E402
from tinker_cookbook.tokenizer_utils import get_tokenizer  # noqa: E402

RENDERER = "qwen3_instruct"  # Qwen's ChatML without <think>: Qwen2 is not in the cookbook's model table


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cookbook-server")
    with recipe_server(root, [str(tiny_model_dir)]) as running:
        yield running


@pytest.fixture(autouse=True)
def _offline(monkeypatch, server):
    offline_cookbook(monkeypatch, server.url)


def test_the_cookbook_supervised_loop_trains_and_checkpoints(server, tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)  # the server's model name; also a folder the cookbook's tokenizer loads from
    data = tmp_path / "sl.jsonl"
    with data.open("w") as f:
        for a, b in [(2, 3), (4, 1), (5, 5), (7, 2)]:
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {a}+{b}?"},
                            {"role": "assistant", "content": f"{a + b}"},
                        ]
                    }
                )
                + "\n"
            )
    log_path = tmp_path / "sl_run"
    config = sl_train.Config(
        log_path=str(log_path),
        model_name=model,
        recipe_name="local_sl",
        renderer_name=RENDERER,
        dataset_builder=FromConversationFileBuilder(
            file_path=str(data),
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=model, renderer_name=RENDERER, max_length=256, batch_size=2
            ),
        ),
        learning_rate=2e-2,
        lora_rank=8,
        num_epochs=4,
        max_steps=6,
        save_every=3,
        eval_every=0,
        infrequent_eval_every=0,
    )
    asyncio.run(sl_train.main(config))
    metrics = rows(log_path / "metrics.jsonl")
    nll = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert len(nll) == 6 and nll[-1] < nll[0], nll  # the loss on the training data fell
    saved = rows(log_path / "checkpoints.jsonl")
    final = saved[-1]
    assert final["state_path"].startswith("tinker://") and final["sampler_path"].endswith("/sampler_weights/final")
    import tinker

    listed = tinker.RestClient(base_url=server.url).list_checkpoints(final["state_path"].split("/")[2]).result()
    assert {"weights/final", "sampler_weights/final"} <= {c.checkpoint_id for c in listed.checkpoints}


class _SumEnv(ProblemEnv):
    def __init__(self, renderer, question: str, answer: str):
        super().__init__(renderer, format_coef=0.0)
        self.question, self.answer = question, answer

    def get_question(self) -> str:
        return self.question

    def check_answer(self, sample_str: str) -> bool:
        # A random tiny model is never right; a reward it earns half the time gives every group
        # mixed rewards, so advantages (and gradients) are nonzero.
        return len(sample_str) % 2 == 0

    def check_format(self, sample_str: str) -> bool:
        return True

    def get_reference_answer(self) -> str:
        return self.answer


class _SumDataset(RLDataset):
    def __init__(self, problems: list[dict], batch_size: int, group_size: int, model: str):
        self.problems, self.batch_size, self.group_size = problems, batch_size, group_size
        self.renderer = renderers.get_renderer(RENDERER, get_tokenizer(model))

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        batch = self.problems[index * self.batch_size : (index + 1) * self.batch_size]
        return [
            ProblemGroupBuilder(
                env_thunk=lambda p=p: _SumEnv(self.renderer, p["question"], p["answer"]),
                num_envs=self.group_size,
                dataset_name="sums",
            )
            for p in batch
        ]

    def __len__(self) -> int:
        return len(self.problems) // self.batch_size


@chz.chz
class _SumDatasetBuilder(RLDatasetBuilder):
    """Problems from a local JSONL file ({"question", "answer"} a line)."""

    file_path: str
    batch_size: int
    group_size: int
    model: str

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        with open(self.file_path) as f:
            problems = [json.loads(line) for line in f if line.strip()]
        return _SumDataset(problems, self.batch_size, self.group_size, self.model), None


def test_the_cookbook_rl_loop_samples_trains_and_checkpoints(server, tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    data = tmp_path / "rl.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n"
            for a, b in [(2, 3), (4, 1), (5, 5), (7, 2)]
        )
    )
    log_path = tmp_path / "rl_run"
    config = rl_train.Config(
        learning_rate=1e-3,
        model_name=model,
        recipe_name="local_rl",
        renderer_name=RENDERER,
        max_tokens=8,
        log_path=str(log_path),
        lora_rank=8,
        max_steps=2,
        save_every=0,
        eval_every=0,
        dataset_builder=_SumDatasetBuilder(file_path=str(data), batch_size=2, group_size=4, model=model),
        loss_fn="importance_sampling",
    )
    asyncio.run(rl_train.main(config))
    steps = [m for m in rows(log_path / "metrics.jsonl") if "env/all/reward/total" in m]
    assert len(steps) == 2
    # The sampler's logprobs of its own tokens equal the trainer's: the same weights on both sides.
    assert all(abs(m["optim/kl_sample_train_v1"]) < 1e-3 for m in steps), steps
    # Some groups have mixed rewards (an even-length reply is "correct"), so the policy gradient moved.
    assert any(m["grad_norm"] > 0 for m in steps)
    final = rows(log_path / "checkpoints.jsonl")[-1]
    assert final["state_path"].endswith("/weights/final")
