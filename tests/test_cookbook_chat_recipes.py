"""tinker-cookbook 0.6.1's recipes through their own entry points (`cli_main` of each recipe's CLI
config), unmodified, against a real `eztinker server` on the tiny Qwen2.

Only configuration changes: the model names (the server's folders), the renderer (the tiny model
is not in the cookbook's model table), the log path, and, where a default would run for hours on a
random tiny model (thousands of prompts, 4096-token replies that never stop), the batch sizes and
reply length. The data is the recipes' default datasets, read from local copies of their Hub
repositories (tests/hub_datasets.py) in the working directory.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

pytest.importorskip("tinker_cookbook", reason="needs tinker-cookbook (scripts/setup.sh installs it)")

from hub_datasets import write_hub_mirror  # noqa: E402
from recipe_runs import offline_cookbook, recipe_server, rows  # noqa: E402
from support import TINY_BPE_TOKENS  # noqa: E402

from eztinker.tiny import make_tiny_model  # noqa: E402

RENDERER = "qwen3_instruct"  # Qwen's ChatML without <think>: Qwen2 is not in the cookbook's model table


# The cookbook's chat datasets build a renderer per example, and Qwen3's renderer deep-copies the
# tokenizer (0.33 s for Qwen2's 151k tokens, 256 times a chat_sl batch): these models keep Qwen2's
# first 16k tokens, with its ids and merges (eztinker.tiny.trim_vocabulary), as the suite's tiny model does.


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A second tiny Qwen2 with other random weights: a teacher the student does not match."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-teacher"), seed=7, vocab_size=TINY_BPE_TOKENS)


# sl_loop's default model, in the cookbook's model table: the tiny model is also served under this name.
SL_LOOP_MODEL = "Qwen/Qwen3.5-9B-Base"


@pytest.fixture(scope="module")
def server(student_dir, teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes-server")
    models = [str(student_dir), str(teacher_dir), f"{SL_LOOP_MODEL}={student_dir}"]
    with recipe_server(root, models, startup_timeout=300) as running:
        yield running


@pytest.fixture(scope="module")
def hub_mirror(tmp_path_factory, gsm8k_dir):
    return write_hub_mirror(tmp_path_factory.mktemp("hub-mirror"), gsm8k_dir)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, server, hub_mirror):
    offline_cookbook(monkeypatch, server.url)
    monkeypatch.chdir(hub_mirror)  # `load_dataset("<org>/<name>")` reads the local copy


def test_chat_sl_trains_on_its_default_dataset_with_its_defaults(student_dir, tmp_path):
    from tinker_cookbook.recipes.chat_sl import train as chat_sl

    log_path = tmp_path / "chat_sl"
    started = time.monotonic()
    chat_sl.cli_main(
        chat_sl.CLIConfig(
            model_name=str(student_dir),
            renderer_name=RENDERER,
            log_path=str(log_path),
            behavior_if_log_dir_exists="delete",
        )
    )
    print(f"chat_sl: {time.monotonic() - started:.1f} s")
    steps = [m for m in rows(log_path / "metrics.jsonl") if "train_mean_nll" in m]
    # no_robots' 300 local conversations in batches of 256 (the default): one step, then the final save.
    assert len(steps) == 1 and math.isfinite(steps[0]["train_mean_nll"]), steps
    final = rows(log_path / "checkpoints.jsonl")[-1]
    assert final["state_path"].endswith("/weights/final")


def test_dpo_starts_at_log_2_and_moves_the_policy(student_dir, tmp_path):
    from tinker_cookbook.recipes.preference.dpo import train as dpo

    log_path = tmp_path / "dpo"
    started = time.monotonic()
    dpo.cli_main(
        dpo.CLIConfig(
            model_name=str(student_dir),
            renderer_name=RENDERER,
            log_path=str(log_path),
            behavior_if_log_dir_exists="delete",
            max_steps=1,
        )
    )
    print(f"dpo: {time.monotonic() - started:.1f} s")
    steps = [m for m in rows(log_path / "metrics.jsonl") if "dpo_loss" in m]
    assert len(steps) == 1, rows(log_path / "metrics.jsonl")
    # The policy starts as the reference (LoRA's B is zero), so every pair's margin is 0 and the loss
    # is log 2 exactly: the server's logprobs for the policy and the reference agree.
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4), steps


def test_on_policy_distillation_from_a_second_base_model(student_dir, teacher_dir, tmp_path):
    from tinker_cookbook.recipes.distillation import on_policy_distillation as opd

    log_path = tmp_path / "distill"
    started = time.monotonic()
    asyncio.run(
        opd.cli_main(
            opd.CLIConfig(
                model_name=str(student_dir),
                teacher_model=str(teacher_dir),
                renderer_name=RENDERER,
                log_path=str(log_path),
                behavior_if_log_dir_exists="delete",
                max_steps=2,
                groups_per_batch=2,
                max_tokens=16,
            )
        )
    )  # the defaults (1024 groups, 4096 tokens) take hours here
    print(f"on-policy distillation: {time.monotonic() - started:.1f} s")
    steps = [{k: v for k, v in m.items() if "kl" in k} for m in rows(log_path / "metrics.jsonl") if "teacher_kl" in m]
    assert len(steps) == 2, rows(log_path / "metrics.jsonl")
    # The teacher has other weights, so its logprobs of the student's replies differ from the
    # student's (a random tiny model is near uniform: the difference is small, but not zero), and
    # the sampler's logprobs are the trainer's (the importance ratio is 1).
    assert all(abs(m["teacher_kl"]) > 1e-5 for m in steps), steps
    assert all(abs(m["optim/kl_sample_train_v1"]) < 1e-3 for m in steps), steps


def test_sl_loop_runs_with_its_defaults_on_a_model_served_under_a_table_name(
    server, student_dir, tmp_path, monkeypatch
):
    """`recipes/sl_loop.py` unmodified with its default Config (model Qwen/Qwen3.5-9B-Base, whose
    renderer it looks up in the cookbook's model table; batch 128; no_robots), on the tiny model
    served under that name (`--model NAME=FOLDER`). Its tokenizer is registered with the cookbook's
    own hook, loading the folder get_info names (offline, a Hub name loads nothing)."""
    from tinker_cookbook import tokenizer_utils
    from tinker_cookbook.recipes import sl_loop
    from transformers import AutoTokenizer

    config = sl_loop.Config(log_path=str(tmp_path / "sl-loop"))
    assert config.model_name == SL_LOOP_MODEL and config.batch_size == 128
    monkeypatch.setitem(
        tokenizer_utils._CUSTOM_TOKENIZER_REGISTRY, SL_LOOP_MODEL, lambda: AutoTokenizer.from_pretrained(student_dir)
    )
    sl_loop.main(config)
    steps = [m for m in rows(tmp_path / "sl-loop" / "metrics.jsonl") if "train_mean_nll" in m]
    # The mirror's 300 conversations: 2 whole batches of 128 (the rest dropped), one epoch.
    assert len(steps) == 2 and all(m["num_sequences"] == 128 and m["train_mean_nll"] > 0 for m in steps)
    final = rows(tmp_path / "sl-loop" / "checkpoints.jsonl")[-1]
    import tinker

    run = tinker.RestClient(base_url=server.url).get_training_run(final["state_path"].split("/")[2]).result()
    assert run.base_model == SL_LOOP_MODEL
