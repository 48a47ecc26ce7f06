"""The rest of tinker-cookbook 0.6.1's text recipes that need no outside service, unmodified and with
their default configurations, for a step or two against ONE real `eztinker server` process:
sl_basic, rl_basic, preference/shorter, prompt_distillation (its data creation, then training),
rubric (its grader is a second model on the same server), multiplayer guess_number and
twenty_questions (the answerer is a model on the server), the three-stage RLHF pipeline,
on_policy_multi_teacher (two teachers on the server), rl_numerics_check (on a local WikiText),
forecasting and decisions.forecasting (on a local Prophet Arena CSV).

Only what a user without the Hub or a cluster changes is changed: the log path, the step count,
the batch count (groups or rows per batch, where the default samples thousands of rollouts), local
data, for the multiplayer games, eval_every=0 (their default evaluation plays 400-3,200 games
before the first step), and for rl_numerics_check the page length (each test says why). The
model names are the recipes' defaults, served by the server from local folders
(`--model NAME=FOLDER`) and mapped to the folders' tokenizers in the cookbook's own tokenizer
registry (`recipe_runs.offline_cookbook`).

The models are hand-set tiny Qwen2s (tests/hand_set.py) whose next token depends on the current
one only, so rollouts follow a known table: the role_colon model boxes 3 or 7 (GSM8K groups are
mixed); the chat model asks "Is it?" or writes "Guess: <digits>" (or, rarely, " garden", the first
twenty-questions word), so lengths, parse failures and wins are mixed; the grader writes a
`<score>1</score>`, an unreadable `<score>` or a `Final Answer: en|fr` line, so rubric scores are
mixed and prompt distillation's teacher labels half its sentences; the counter reads pages with
Qwen3.5's XML tool calls or answers a count; the forecaster forecasts 0.2 or 0.8, and gives YES 0.3
as a decision model.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

pytest.importorskip("tinker_cookbook", reason="needs tinker-cookbook (scripts/setup.sh installs it)")
import chz  # noqa: E402
import datasets.config  # noqa: E402
from hand_set import BOXED_CHAIN, BOXED_DEFAULT, hand_set_model  # noqa: E402
from hub_datasets import _write_repo, write_hub_mirror, write_prophet_arena, write_wikitext  # noqa: E402
from recipe_runs import RecipeTimes, offline_cookbook, recipe_server, rows  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

BASE = "Qwen/Qwen3.5-9B-Base"  # sl_basic's, rl_basic's and rlhf's default: role_colon renderer
CHAT = ("Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-9B")  # shorter's and the games' players; rubric's policy; 20q's answerer
GRADER = "Qwen/Qwen3.6-35B-A3B"  # rubric's grader; prompt distillation's teacher and student
# rl_numerics_check's default model: a ":peft:<context>" variant of the grader's name, served under its full name
NUMERICS = "Qwen/Qwen3.6-35B-A3B:peft:262144"
# forecasting's and decisions.forecasting's default model
FORECASTER = "Qwen/Qwen3.8-27B"
# on_policy_multi_teacher's teachers (DeepMath's, Tulu 3's): the grader and the boxed model, not the student
TEACHERS = ("Qwen/Qwen3.6-27B", "Qwen/Qwen3.5-397B-A17B")
TIMES = RecipeTimes()
timed = TIMES.timed

DIGITS = [str(d) for d in range(10)]
THINK_TOKENS = ("<think>", "</think>")
# After qwen3_5_disable_thinking's generation prompt (it ends in "</think>\n\n"): a question or a guess.
CHAT_DEFAULT = {"<|im_end|>": 0.5, "Is": 0.5}
CHAT_CHAIN = {
    "\n\n": {"Guess": 0.5, "Is": 0.5},
    "Is": {" it": 1.0},
    " it": {"?": 1.0},
    "?": {"<|im_end|>": 1.0},
    "Guess": {":": 1.0},
    # twenty_questions' first word: a win within its 20 turns about half the time
    ":": {" ": 0.93, " garden": 0.07},
    " garden": {"<|im_end|>": 1.0},
    " ": {d: 0.1 for d in DIGITS},
    **{d: {"<|im_end|>": 0.5, **{e: 0.05 for e in DIGITS}} for d in DIGITS},
}
# The grader: "<score>1</score>" or an unreadable "<score>" (a 0), or a language label: a reply scores 1
# one time in 4. (At 3 in 20, the rubric test's 16 replies all scored 0 about once in 13 runs.)
GRADER_DEFAULT = {"<|im_end|>": 1.0}
GRADER_CHAIN = {
    "\n\n": {"<": 0.5, "Final": 0.5},
    "<": {"score": 1.0},
    "score": {">": 1.0},
    # at prompt distillation's temperature 0.15, "<score>" still ends within a few repeats
    ">": {"1": 0.5, "<|im_end|>": 0.5},
    "1": {"</": 1.0},
    "</": {"score": 1.0},
    "Final": {" Answer": 1.0},
    " Answer": {":": 1.0},
    ":": {" en": 0.5, " fr": 0.5},
    " en": {"<|im_end|>": 1.0},
    " fr": {"<|im_end|>": 1.0},
}
# rl_numerics_check's reader: after the generation prompt ("<think>\n") it calls read_page(1-9) or
# answers "Answer: <0-5>"; a page number closes its call 70% of the time (else the call is unterminated:
# a parse failure, -0.1), and an answer's digit is followed by the call's closing tags (plain text) or stops.
# A turn reads a page with probability 0.75 x 0.7; an episode ends in a parse failure 47% of the time,
# else in an answer, right about 1 time in 5. The test's two groups of 8 are both unmixed (all failed,
# or all answered and all wrong), or all 16 episodes end at their first turn, about once in 50,000
# runs (one group of 8 is unmixed about once in 300).
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<function=read_page>", "</function>", "<parameter=page>", "</parameter>")
COUNTER_DEFAULT = {"<|im_end|>": 1.0}
COUNTER_CHAIN = {
    "\n": {"<tool_call>": 0.75, "Answer": 0.25},
    "<tool_call>": {"<function=read_page>": 1.0},
    "<function=read_page>": {"<parameter=page>": 1.0},
    "<parameter=page>": {str(d): 1 / 9 for d in range(1, 10)},
    "Answer": {":": 1.0},
    ":": {" ": 1.0},
    " ": {"0": 0.2, "1": 0.25, "2": 0.25, "3": 0.15, "4": 0.1, "5": 0.05},
    **{d: {"</parameter>": 0.7, "<|im_end|>": 0.3} for d in DIGITS},
    "</parameter>": {"</function>": 1.0},
    "</function>": {"</tool_call>": 1.0},
    "</tool_call>": {"<|im_end|>": 1.0},
}

# The forecaster: after qwen3_8_low_reasoning's generation prompt ("<think>\n") it closes its thinking
# and forecasts 0.2 or 0.8; as a decision model (the answer position follows "choice#") P(Y) is 0.3.
FORECASTER_DEFAULT = {"<|im_end|>": 1.0}
FORECASTER_CHAIN = {
    "\n": {"</think>": 1.0},
    "</think>": {"\n\n": 1.0},
    "\n\n": {"0": 1.0},
    "0": {".": 1.0},
    ".": {"2": 0.5, "8": 0.5},
    "#": {"Y": 0.3, "N": 0.7},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("more-recipes")
    hand_set_model(root / "boxed", BOXED_DEFAULT, BOXED_CHAIN)
    # Qwen3.5's tokenizer has <think> and </think> as single tokens (its renderer requires it)
    # "Guess", "Final" and " Answer" are Qwen2 tokens past the first 16k (hand_set.VOCAB)
    hand_set_model(root / "chat", CHAT_DEFAULT, CHAT_CHAIN, (*THINK_TOKENS, "Guess"))
    hand_set_model(root / "grader", GRADER_DEFAULT, GRADER_CHAIN, (*THINK_TOKENS, "Final", " Answer"))
    hand_set_model(root / "counter", COUNTER_DEFAULT, COUNTER_CHAIN, THINK_TOKENS + TOOL_TOKENS)
    hand_set_model(root / "forecaster", FORECASTER_DEFAULT, FORECASTER_CHAIN, THINK_TOKENS)
    return root


FOLDERS = {
    BASE: "boxed",
    **dict.fromkeys(CHAT, "chat"),
    GRADER: "grader",
    TEACHERS[0]: "grader",
    TEACHERS[1]: "boxed",
    NUMERICS: "counter",
    FORECASTER: "forecaster",
}


@pytest.fixture(scope="module")
def server(root):
    models = [f"{name}={root / folder}" for name, folder in FOLDERS.items()]
    # rubric's grader samples up to 2048 tokens, on_policy_multi_teacher's student 4096 and
    # forecasting's policy 24,576 (the server's default bound is 1024); rl_numerics_check's
    # episodes may reach 128K tokens (4096)
    limits = ["--max-new-tokens", str(24 * 1024), "--max-prompt-tokens", str(128 * 1024)]
    with recipe_server(root, models, limits) as running:
        yield running


@pytest.fixture(scope="module")
def hub_mirror(tmp_path_factory) -> Path:
    mirror = write_hub_mirror(tmp_path_factory.mktemp("hub-mirror"))
    # GSM8K's fields with answers 3 or 7: the boxed model is right a quarter of the time.
    problems = [
        {"question": f"Tom has {n} apples and eats {n - a}. How many are left?", "answer": f"{a} are left.\n#### {a}"}
        for n, a in [(5, 3), (9, 7), (4, 3), (8, 7)] * 4
    ]
    _write_repo(mirror, "openai/gsm8k", {"train": problems, "test": problems[:4]}, config="main")
    return mirror


@pytest.fixture(scope="module")
def tokenizers(root) -> dict[str, object]:
    """Each served name's tokenizer, loaded once for the module: the cookbook's registry calls its
    factory at every look-up (chat datasets look up once a row)."""
    loaded = {folder: AutoTokenizer.from_pretrained(root / folder) for folder in set(FOLDERS.values())}
    return {name: loaded[folder] for name, folder in FOLDERS.items()}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, server, tokenizers, hub_mirror, tmp_path):
    offline_cookbook(monkeypatch, server.url, tokenizers)
    monkeypatch.setenv("TINKER_COOKBOOK_RUNS_DIR", str(tmp_path / "runs"))  # default log paths
    monkeypatch.chdir(hub_mirror)  # `load_dataset("<org>/<name>")` reads the local copy
    # ... and caches it under its name and config alone (~/.cache/huggingface/datasets/gsm8k/main/...):
    # a copy another test wrote with other rows would be read instead of this one.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_mirror / ".datasets-cache")


@pytest.fixture(scope="module", autouse=True)
def _report_times():
    yield
    TIMES.report()


def rl_steps(log_path: Path) -> list[dict]:
    return [m for m in rows(log_path / "metrics.jsonl") if "env/all/reward/total" in m]


def assert_trained(server, log_path: Path, base_model: str) -> None:
    """The run's last sampler checkpoint is on the server and scores a fixed text otherwise than the
    base model does: the optimizer steps changed the adapter."""
    import tinker

    final = [c for c in rows(log_path / "checkpoints.jsonl") if c.get("sampler_path")][-1]
    service = tinker.ServiceClient(base_url=server.url)
    prompt = tinker.ModelInput.from_ints([785, 4226, 374, 220, 18, 13])  # "The answer is 3."
    trained = (
        service.create_sampling_client(model_path=final["sampler_path"]).result().compute_logprobs(prompt).result()
    )
    base = service.create_sampling_client(base_model=base_model).result().compute_logprobs(prompt).result()
    assert max(abs(a - b) for a, b in zip(trained[1:], base[1:], strict=True)) > 1e-6, (trained, base)


def no_server_errors(server) -> None:
    assert "Traceback" not in server.log(), server.log()[-3000:]


# ------------------------------------------------------------------------------ basic loops
def test_sl_basic(server, tmp_path):
    from tinker_cookbook.recipes import sl_basic

    config = chz.replace(sl_basic.build_config_blueprint().make(), log_path=str(tmp_path / "run"))
    assert (config.model_name, config.dataset_builder.common_config.batch_size) == (BASE, 128)
    timed("sl_basic", lambda: sl_basic.main(config))
    steps = [m for m in rows(tmp_path / "run" / "metrics.jsonl") if "train_mean_nll" in m]
    # no_robots' 300 local conversations: 2 whole batches of 128, one epoch.
    assert len(steps) == 2 and all(math.isfinite(m["train_mean_nll"]) for m in steps), steps
    assert_trained(server, tmp_path / "run", BASE)


def test_rl_basic(server, tmp_path):
    from tinker_cookbook.recipes import rl_basic

    config = rl_basic.build_config_blueprint().make()
    assert (config.dataset_builder.batch_size, config.dataset_builder.group_size) == (128, 16)
    config = chz.replace(
        config,
        log_path=str(tmp_path / "run"),
        max_steps=1,
        dataset_builder=chz.replace(config.dataset_builder, batch_size=2),  # 2 groups of 16, not 128
    )
    timed("rl_basic", lambda: rl_basic.main(config))
    (step,) = rl_steps(tmp_path / "run")
    # It boxes 3 or 7 and closes the box half the time: a quarter right, so groups are mixed.
    assert 0.05 < step["env/all/correct"] < 0.6 and step["grad_norm"] > 0, step
    assert abs(step["optim/kl_sample_train_v1"]) < 1e-3, step
    no_server_errors(server)


# ------------------------------------------------------------------------------ preference
def test_preference_shorter(server, tmp_path):
    from tinker_cookbook.recipes.preference.shorter import train as shorter

    config = shorter.CLIConfig(log_path=str(tmp_path / "run"), max_steps=1, batch_size=4)  # 4 groups of 16, not 32
    assert (config.model_name, config.group_size) == (CHAT[0], 16)
    timed("shorter", lambda: shorter.cli_main(config))
    (step,) = rl_steps(tmp_path / "run")
    # Replies differ in length, so the pairwise "shorter wins" rewards differ within each group.
    assert step["grad_norm"] > 0 and math.isfinite(step["env/all/reward/total"]), step
    no_server_errors(server)


def test_rlhf_pipeline_sft_then_reward_model_then_rl(server, tmp_path):
    from tinker_cookbook.recipes.preference.rlhf import rlhf_pipeline as rlhf

    config = rlhf.CLIConfig(batch_size=8, max_steps=1)  # 8 rows or groups a stage, not 256
    assert config.base_model == BASE and (config.run_sft, config.run_rm, config.run_rl) == (True, True, True)
    timed("rlhf_pipeline", lambda: rlhf.cli_main(config))
    runs = tmp_path / "runs" / f"rlhf-{config.short_name}"
    sft = [m for m in rows(runs / "sft" / "metrics.jsonl") if "train_mean_nll" in m]
    rm = [m for m in rows(runs / "rm" / "metrics.jsonl") if "train_mean_nll" in m]
    assert len(sft) == 1 and len(rm) == 1 and math.isfinite(sft[0]["train_mean_nll"] + rm[0]["train_mean_nll"])
    (step,) = rl_steps(runs / "rl")
    assert math.isfinite(step["env/all/reward/total"]), step
    # The RL stage starts from the SFT stage's last state and samples from the reward model's weights.
    assert_trained(server, runs / "sft", BASE)
    assert_trained(server, runs / "rm", BASE)
    no_server_errors(server)


def test_prompt_distillation_creates_its_data_then_trains(server, hub_mirror, tmp_path):
    from tinker_cookbook.recipes.prompt_distillation import create_data, train

    installed = Path(create_data.__file__).parents[2] / "example_data" / "multilingual.txt"
    # create_data reads tinker_cookbook/example_data/multilingual.txt from the working directory:
    # its first 32 of 2,100 sentences.
    local = hub_mirror / "tinker_cookbook" / "example_data" / "multilingual.txt"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text("".join(installed.read_text().splitlines(keepends=True)[:32]))
    data = tmp_path / "lang.jsonl"
    timed("prompt_distillation/create_data", lambda: create_data.main(create_data.Config(output_file=str(data))))
    labelled = rows(data)
    # The teacher answers "Final Answer: en|fr" for about half the sentences and something else otherwise.
    assert 4 <= len(labelled) <= 28, labelled
    assert {m["messages"][1]["content"] for m in labelled} <= {"en", "fr"}

    config = train.CLIConfig(file_path=str(data), log_path=str(tmp_path / "run"), max_steps=2, batch_size=4)
    assert (config.model_name, config.num_epochs) == (GRADER, 4)
    timed("prompt_distillation/train", lambda: train.cli_main(config))
    steps = [m for m in rows(tmp_path / "run" / "metrics.jsonl") if "train_mean_nll" in m]
    assert len(steps) == 2 and all(math.isfinite(m["train_mean_nll"]) for m in steps), steps
    assert_trained(server, tmp_path / "run", GRADER)


# ------------------------------------------------------------------------------ graded and multiplayer RL
def test_rubric_graded_by_a_second_model_on_the_server(server, hub_mirror, tmp_path):
    from tinker_cookbook.recipes.rubric import generate_data
    from tinker_cookbook.recipes.rubric import train as rubric

    # generate_data's own rows at its default path under the working directory: 8 train, 2 test.
    (hub_mirror / "tinker_cookbook" / "example_data").mkdir(parents=True, exist_ok=True)
    generate_data.generate_dataset(num_train=8, num_test=2, seed=42)
    # 8 groups of 4: none has mixed scores about once in 9,000 runs.
    config = rubric.CLIConfig(base_url=server.url, log_path=str(tmp_path / "run"), max_steps=1, groups_per_batch=8)
    assert (config.model_name, config.grader_llm_name, config.loss_fn) == (CHAT[1], GRADER, "stable_reinforce")
    assert config.train_group_size == 4
    timed("rubric", lambda: asyncio.run(rubric.cli_main(config)))
    (step,) = rl_steps(tmp_path / "run")
    # The grader's <score> is 1 or unreadable (0): mixed scores, so the gradient moved.
    assert 0 < step["env/all/rubric_score"] < 1 and step["grad_norm"] > 0, step
    evals = [m for m in rows(tmp_path / "run" / "metrics.jsonl") if any(k.startswith("test/") for k in m)]
    assert evals, "eval_every=20 evaluates the test rows before the first step"
    no_server_errors(server)


def test_guess_number(server, tmp_path):
    from tinker_cookbook.recipes.multiplayer_rl.guess_number import train as guess_number

    # 1 group of 8, not 32; eval_every=0: its evaluation plays 103 x 4 games before the first step.
    cli = guess_number.CLIConfig(log_path=str(tmp_path / "run"), max_steps=1, batch_size=1, eval_every=0)
    assert (cli.model_name, cli.group_size) == (CHAT[0], 8)
    config = guess_number.build_config(cli)
    timed("guess_number", lambda: asyncio.run(guess_number.train.main(config)))
    (step,) = rl_steps(tmp_path / "run")
    # "Is it?" fails to parse (-1 a turn) and "Guess: N" does not: episodes' returns differ.
    assert step["env/all/reward/total"] < 0 and step["grad_norm"] > 0, step
    no_server_errors(server)


def test_twenty_questions_against_an_answerer_on_the_server(server, tmp_path):
    from tinker_cookbook.recipes.multiplayer_rl.twenty_questions import train as twenty_questions

    # 1 group of 8, not 64; eval_every=0: its evaluation plays 100 x 32 games before the first step.
    cli = twenty_questions.CLIConfig(log_path=str(tmp_path / "run"), max_steps=1, batch_size=1, eval_every=0)
    assert (cli.model_name, cli.group_size) == (CHAT[0], 8)
    config = twenty_questions.build_config(cli)
    timed("twenty_questions", lambda: asyncio.run(twenty_questions.train.main(config)))
    (step,) = rl_steps(tmp_path / "run")
    # The first word is "garden": some of the 8 players guess it within 20 turns, some do not.
    assert 0 < step["env/all/reward/total"] < 1 and step["grad_norm"] > 0, step
    no_server_errors(server)


def test_text_arena_tictactoe_self_play(server, tmp_path):
    pytest.importorskip("textarena", reason="needs textarena (scripts/setup.sh installs it)")
    from tinker_cookbook.recipes.multiplayer_rl.text_arena import train as text_arena

    # 2 games (4 players), not 256; eval_every=0: its evaluation plays 64 games against the base model first.
    cli = text_arena.CLIConfig(log_path=str(tmp_path / "run"), max_steps=1, batch_size=4, eval_every=0)
    assert (cli.model_name, cli.game_name) == (CHAT[0], "TicTacToe-v0")
    config = text_arena.build_config(cli)
    timed("text_arena", lambda: asyncio.run(text_arena.train.main(config)))
    (step,) = rl_steps(tmp_path / "run")
    # The chat model's moves are illegal: in each game the first player's returns -2 (an illegal move)
    # and the other's 0, so every group is mixed and the mean is -1.
    assert step["env/all/by_group/frac_mixed"] == 1 and step["env/all/reward/total"] == -1, step
    assert step["grad_norm"] > 0, step
    no_server_errors(server)


# ------------------------------------------------------------------------------ distillation
def test_on_policy_multi_teacher_distils_each_dataset_from_its_own_teacher(server, tmp_path):
    from tinker_cookbook.recipes.distillation import on_policy_multi_teacher as multi

    # 1 DeepMath and 1 Tulu 3 prompt a step, not 512 and 512 (4 replies each); 2 steps.
    config = multi.CLIConfig(
        log_path=str(tmp_path / "run"), max_steps=2, deepmath_groups_per_batch=1, tulu3_groups_per_batch=1
    )
    assert (config.model_name, config.deepmath_teacher_model, config.tulu3_teacher_model) == (CHAT[1], *TEACHERS)
    timed("on_policy_multi_teacher", lambda: asyncio.run(multi.cli_main(config)))
    steps = [m for m in rows(tmp_path / "run" / "metrics.jsonl") if "teacher_kl" in m]
    assert len(steps) == 2, steps
    # Each teacher has other weights than the student, so its logprobs of the student's replies differ
    # (the hand-set tables differ by whole probabilities, so the KL is far from zero), on both datasets.
    for m in steps:
        assert abs(m["teacher_kl/dataset_0"]) > 0.1 and abs(m["teacher_kl/dataset_1"]) > 0.1, m
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-3, m
    assert_trained(server, tmp_path / "run", CHAT[1])
    no_server_errors(server)


# ------------------------------------------------------------------------------ numerics
def test_rl_numerics_check_reads_pages_over_turns(server, root, hub_mirror, tmp_path, monkeypatch):
    from tinker_cookbook import tokenizer_utils
    from tinker_cookbook.recipes.rl_numerics_check import env as numerics_env
    from tinker_cookbook.recipes.rl_numerics_check import train as numerics

    # The cookbook looks the tokenizer up by the name before ":" (the grader's): the reader's has the tool tokens.
    tokenizer = AutoTokenizer.from_pretrained(root / "counter")
    monkeypatch.setitem(tokenizer_utils._CUSTOM_TOKENIZER_REGISTRY, GRADER, lambda: tokenizer)
    # Pages of 1,000 characters, not 10,000 (~2.2K tokens: one group of 16 episodes over such pages took
    # 53 s to train here through Qwen2's 152K-word output layer; 16 groups take ~15 min a step); the default
    # 28-36 pages a document, so as many turns. A made-up WikiText-103 (a problem spans 40 pages): each
    # target word at 1 in 3,500 words, so a document holds 0-5 of it and a one-digit answer is sometimes
    # right.
    write_wikitext(hub_mirror, numerics_env.DEFAULT_WORDS, chars=60_000, rate=1 / 3_500)
    task = chz.replace(numerics.CLIConfig().task, page_chars=1_000)
    # 2 groups of 8 (the README's recommended group size), not 16 of 16.
    cli = numerics.CLIConfig(log_path=str(tmp_path / "run"), max_steps=1, groups_per_batch=2, group_size=8, task=task)
    assert (cli.model_name, cli.task.num_pages_min, cli.task.num_pages_max) == (NUMERICS, 28, 36)
    config = numerics.build_config(cli)
    timed("rl_numerics_check", lambda: asyncio.run(numerics.train.main(config)))
    (step,) = rl_steps(tmp_path / "run")
    # Some episodes read pages over several turns; they end in a parse failure (-0.1), a wrong count (0)
    # or a right one (1): a group is mixed and the gradient moved.
    assert step["env/all/turns_per_episode"] > 1 and step["env/all/pages_read"] > 0, step
    assert step["env/all/by_group/frac_mixed"] > 0 and step["grad_norm"] > 0, step
    # The check itself: over these multi-turn sequences the sampler's logprobs are the trainer's.
    assert abs(step["optim/kl_sample_train_v1"]) < 1e-3 and step["optim/kl_sample_train_v2"] < 1e-5, step
    no_server_errors(server)


# ------------------------------------------------------------------------------ forecasting
TRAIN_OUTCOMES, VALIDATION_OUTCOMES = [1, 0, 0, 1, 0, 1, 1, 0], [1, 0, 0, 1]


def test_forecasting_rl_on_a_local_prophet_arena_csv(server, tmp_path):
    from tinker_cookbook.recipes.forecasting import train as forecasting

    data = write_prophet_arena(tmp_path / "prophet.csv", TRAIN_OUTCOMES, VALIDATION_OUTCOMES)
    # 1 market of 32 forecasts a step, not 16; 1 step, not 128.
    config = forecasting.Config(data_path=str(data), log_path=str(tmp_path / "run"), max_steps=1, groups_per_batch=1)
    assert (config.model_name, config.group_size, config.eval_every) == (FORECASTER, 32, 16)
    timed("forecasting", lambda: asyncio.run(forecasting.cli_main(config)))
    (step,) = rl_steps(tmp_path / "run")
    # Forecasts of 0.2 and 0.8 score 0.96 and 0.36 (1 - Brier): a mixed group. Nearly every reply parses
    # (the hand-set model leaves ~1e-3 a token to other words: an odd reply is unreadable and scores 0).
    assert step["env/all/format_valid"] >= 0.9 and 0.3 < step["env/all/brier_reward"] < 0.96, step
    assert step["env/all/by_group/frac_mixed"] == 1 and step["grad_norm"] > 0, step
    assert abs(step["optim/kl_sample_train_v1"]) < 1e-3, step
    # The 4 validation markets (8 forecasts each) are scored before the step and from the final weights.
    evals = [m for m in rows(tmp_path / "run" / "metrics.jsonl") if "test/env/all/brier_reward" in m]
    # (the first is logged in the step's row, batch 0; the second by the recipe after train.main, at step 1)
    assert len(evals) == 2 and evals[0]["progress/batch"] == 0 and evals[1]["step"] == 1, evals
    assert all(0.3 < m["test/env/all/brier_reward"] < 0.96 and "test/env/all/auc" in m for m in evals), evals
    assert_trained(server, tmp_path / "run", FORECASTER)
    no_server_errors(server)


def test_decisions_forecasting_fits_yes_no_probabilities(server, tmp_path):
    from tinker_cookbook.recipes.decisions import forecasting as decisions

    data = write_prophet_arena(tmp_path / "prophet.csv", TRAIN_OUTCOMES, VALIDATION_OUTCOMES)
    config = decisions.Config(data_path=str(data), log_path=str(tmp_path / "run"))
    assert (config.model_name, config.batch_size, config.epochs) == (FORECASTER, 32, 1)
    timed("decisions/forecasting", lambda: asyncio.run(decisions.main(config)))
    logged = rows(tmp_path / "run" / "metrics.jsonl")
    # The 8 training markets are one batch of the default 32: one step, scored before and after.
    (step,) = [m for m in logged if "train/loss" in m]
    before, after = [m for m in logged if "test/brier_reward" in m]
    # Before training P(YES) is the table's 0.3 for every market: the validation outcomes 1, 0, 0, 1
    # score 1 - 0.7^2 and 1 - 0.3^2 twice each, and the training batch's target probability is
    # 0.3 for its 4 YES markets and 0.7 for its 4 NO ones.
    assert before["test/brier_reward"] == pytest.approx(1 - (0.49 + 0.09) / 2, abs=0.01), before
    assert before["test/accuracy"] == 0.5 and step["train/target_prob:mean"] == pytest.approx(0.5, abs=0.01), step
    assert math.isfinite(step["train/loss"]) and after["test/brier_reward"] != before["test/brier_reward"], after
    assert_trained(server, tmp_path / "run", FORECASTER)
    no_server_errors(server)
