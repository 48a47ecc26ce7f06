"""tinker-cookbook 0.6.1's recipe entry points, unmodified and with their default configurations,
for a few steps against one real `eztinker server` process: math_rl (its arithmetic environment;
stable_reinforce by default), async RL (math_rl with max_steps_off_policy), SDFT (top-20 teacher
distillation: [N, K] cross_entropy) and off-policy distillation (n_teacher_targets=20).

Only what a user without the Hub changes is changed: base_url, the log path, max_steps, and
local data. The server presents its model under a name from the cookbook's model table
(`--model Qwen/Qwen3.5-9B-Base=FOLDER`), and the cookbook's own tokenizer registry maps that name
to the folder's tokenizer.

The model is a hand-set tiny Qwen2 (see `hand_set.hand_set_model`): its next token depends only on the
current one, so arithmetic groups earn mixed rewards (a reply that runs past max_tokens without
its stop loses the format reward) and rl_loop's GSM8K-style groups do too (it boxes 3 or 7), and
the policy gradient is not zero. The RL
recipes use the qwen3_instruct renderer (its stop is <|im_end|>) and 8 groups a batch, not 100.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("tinker_cookbook", reason="needs tinker-cookbook (scripts/setup.sh installs it)")
from hand_set import BOXED_CHAIN, BOXED_DEFAULT, hand_set_model  # noqa: E402
from recipe_runs import RecipeTimes, offline_cookbook, recipe_server, rows  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

MODEL = "Qwen/Qwen3.5-9B-Base"  # rl_loop's and off-policy reasoning's default; role_colon renderer
RENDERER = "qwen3_instruct"  # ChatML, whose stop is <|im_end|> (role_colon's is the text "\n\nUser:")
GROUPS = 8  # groups_per_batch for the RL recipes (default 100): mixed groups are all but certain with 8
TIMES = RecipeTimes()
timed = TIMES.timed


DEFAULT, CHAIN = BOXED_DEFAULT, BOXED_CHAIN  # the hand-set model (see hand_set.py)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    hand_set_model(root / MODEL, DEFAULT, CHAIN)
    return root


@pytest.fixture(scope="module")
def server(root):
    # The model table's name for a local folder (--model NAME=PATH).
    # SDFT samples up to 2048 tokens by default (the server's default bound is 1024)
    with recipe_server(root, [f"{MODEL}={root / MODEL}"], ["--max-new-tokens", "2048"]) as running:
        yield running


@pytest.fixture(autouse=True)
def _offline(monkeypatch, server, tokenizer):
    offline_cookbook(monkeypatch, server.url, {MODEL: tokenizer})


@pytest.fixture(scope="module")
def tokenizer(root):
    return AutoTokenizer.from_pretrained(root / MODEL)


@pytest.fixture(scope="module", autouse=True)
def _report_times():
    yield
    TIMES.report()


def server_log_has_no_refusals(server) -> None:
    log = server.log()
    assert "Traceback" not in log, log[-3000:]


# ------------------------------------------------------------------------------ RL recipes
def test_math_rl_arithmetic_with_its_default_stable_reinforce(server, tmp_path):
    from tinker_cookbook.recipes.math_rl import train as math_rl

    config = math_rl.CLIConfig(
        model_name=MODEL,
        renderer_name=RENDERER,
        base_url=server.url,
        log_path=str(tmp_path / "run"),
        max_steps=2,
        groups_per_batch=GROUPS,
    )
    assert (config.loss_fn, config.env) == ("stable_reinforce", "arithmetic")
    timed("math_rl", lambda: asyncio.run(math_rl.cli_main(config)))
    steps = [m for m in rows(tmp_path / "run" / "metrics.jsonl") if "env/all/reward/total" in m]
    assert len(steps) == 2
    for m in steps:
        # Mixed rewards (some replies miss their stop within max_tokens), so the gradient moved ...
        assert 0 < m["env/all/format"] < 1 and m["grad_norm"] > 0, m
        # ... and the sampler's logprobs of its own tokens are the trainer's.
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-3, m
    server_log_has_no_refusals(server)


def test_async_rl_trains_off_policy_with_stable_reinforce(server, tmp_path):
    from tinker_cookbook.recipes.math_rl import train as math_rl

    config = math_rl.CLIConfig(
        model_name=MODEL,
        renderer_name=RENDERER,
        base_url=server.url,
        log_path=str(tmp_path / "run"),
        max_steps=2,
        groups_per_batch=GROUPS,
        max_steps_off_policy=1,
    )
    timed("async_rl", lambda: asyncio.run(math_rl.cli_main(config)))
    steps = [m for m in rows(tmp_path / "run" / "metrics.jsonl") if "env/all/reward/total" in m]
    assert len(steps) == 2 and all(m["grad_norm"] > 0 for m in steps), steps


# ------------------------------------------------------------------------ distillation
def test_sdft_with_top_20_teacher_targets(server, tmp_path):
    from datasets import Dataset
    from tinker_cookbook.recipes.sdft import train as sdft

    data = tmp_path / "toolalpaca"
    # 72 rows: its 90% train split holds two batches of the default 32 groups
    Dataset.from_list(
        [{"prompt": f"What is {a} + {b}?", "golden_response": [str(a + b)]} for a in range(9) for b in range(8)]
    ).save_to_disk(str(data))
    # eval_every=0: cookbook 0.6.1's SDFT evaluator cannot read its own test set (RLTestSetEvaluator
    # takes SDFTDataset.get_batch's (builders, questions, answers) for builders), whatever the server.
    config = sdft.CLIConfig(
        model_name=MODEL,
        base_url=server.url,
        log_path=str(tmp_path / "run"),
        max_steps=2,
        dataset="toolalpaca",
        toolalpaca_data_path=str(data),
        eval_every=0,
    )
    assert (config.topk, config.reverse) == (20, False)
    timed("sdft", lambda: asyncio.run(sdft.cli_main(config)))
    steps = [m for m in rows(tmp_path / "run" / "metrics.jsonl") if "sdft/topk" in m]
    assert len(steps) == 2 and all(m["sdft/topk"] == 20 for m in steps), steps
    server_log_has_no_refusals(server)


def test_off_policy_distillation_with_20_teacher_targets(server, tmp_path):
    from tinker_cookbook.distillation import train_off_policy
    from tinker_cookbook.distillation.datasets import TeacherConfig
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {a}+{b}?"},
                        {"role": "assistant", "content": f"{a + b}"},
                    ]
                }
            )
            + "\n"
            for a, b in [(2, 3), (4, 1), (5, 5), (7, 2)] * 4
        )
    )
    builder = FromConversationFileBuilder(
        file_path=str(data),
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=MODEL, renderer_name="role_colon", max_length=256, batch_size=8
        ),
    )
    config = train_off_policy.Config(
        learning_rate=1e-3,
        model_name=MODEL,
        recipe_name="local_off_policy",
        log_path=str(tmp_path / "run"),
        base_url=server.url,
        max_steps=2,
        dataset_configs=[
            train_off_policy.DatasetWithTeacher(dataset_builder=builder, teacher_config=TeacherConfig(base_model=MODEL))
        ],
    )
    assert config.n_teacher_targets == 20
    timed("off_policy_distillation", lambda: asyncio.run(train_off_policy.main(config)))
    steps = rows(tmp_path / "run" / "metrics.jsonl")
    assert len([m for m in steps if "progress/step" in m or "step" in m]) >= 2, steps
    server_log_has_no_refusals(server)


def test_rl_loop_with_its_default_stable_reinforce(server, tmp_path, monkeypatch):
    import datasets.config
    from hub_datasets import _write_repo
    from tinker_cookbook.recipes import rl_loop

    # A local openai/gsm8k (GSM8K's fields, answers 3 or 7) where load_dataset looks first: the
    # working directory.
    _write_repo(
        tmp_path,
        "openai/gsm8k",
        {
            "train": [
                {"question": f"Tom has {n} apples and eats {n - a}. How many are left?", "answer": f"... #### {a}"}
                for n, a in [(5, 3), (9, 7), (4, 3), (8, 7)]
            ]
        },
        config="main",
    )
    monkeypatch.chdir(tmp_path)
    # `datasets` caches a local folder by name and config only: another test's gsm8k/main would be read.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / ".datasets-cache")
    config = rl_loop.Config(base_url=server.url, log_path=str(tmp_path / "run"), batch_size=2, max_steps=2)
    assert (config.model_name, config.loss_fn) == (MODEL, "stable_reinforce")
    timed("rl_loop", lambda: rl_loop.main(config))
    steps = rows(tmp_path / "run" / "metrics.jsonl")
    assert len(steps) == 2, steps
    # It boxes 3 or 7 at random and closes the box half the time: a quarter right, so groups are mixed.
    rewards = [m["reward/total"] for m in steps]
    assert all(0.05 < r < 0.6 for r in rewards), rewards
    server_log_has_no_refusals(server)
