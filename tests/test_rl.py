"""RL: group advantages and the step's examples against hand computations, one policy-gradient
step moving the replies' likelihoods the way their advantages say, the scorers on fixtures (a
tiny random reward model, an LLM judge on a real server), and the recipe end to end on the tiny
Qwen2 through a real server (outputs, staleness of the pipelined and sequential loops, resume,
the time budget)."""

from __future__ import annotations

import json
import math
import random
import zlib

import pytest
import torch

import eztinker as ez
from eztinker.recipes import scorers
from eztinker.recipes.rl import (
    PLOT_FILE,
    RESULTS_FILE,
    ROLLOUTS_FILE,
    Config,
    Group,
    Reply,
    SampleBuffer,
    epoch_summary,
    group_advantages,
    main,
    policy_datum,
    split_evenly,
    step_data,
    step_metrics,
)
from eztinker.tasks import Problem, get_task

ARITHMETIC = get_task("arithmetic")


def _coin(text: str, problem) -> bool:
    """A random model is never right: a stable coin per reply gives groups mixed rewards."""
    return zlib.crc32(text.encode()) % 2 == 0


# ------------------------------------------------------------------------------ by hand
def test_group_advantages_match_a_hand_computation():
    assert group_advantages([1, 0, 0, 1]) == pytest.approx([1, -1, -1, 1])  # mean 0.5, std 0.5
    assert group_advantages([1, 0, 0, 1], normalize_std=False) == pytest.approx([0.5, -0.5, -0.5, 0.5])
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 4)
    assert group_advantages([1, 0, 0, 0]) == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std])
    assert group_advantages([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]  # nothing to learn from


def test_step_data_skips_zero_advantages_and_averages_over_reply_tokens():
    reply = lambda tokens: Reply("x", tokens, [-0.5] * len(tokens), 1.0, True)  # noqa: E731
    group = Group(Problem("p", "q", "1"), [10, 11, 12], [reply([1, 2]), reply([3]), reply([4, 5, 6])], sampled_at=0)
    group.advantages = [1.0, 0.0, -2.0]
    data, tokens = step_data([group])
    assert tokens == 5 and len(data) == 2  # the zero-advantage reply is not sent
    first = data[0].loss_fn_inputs
    assert data[0].model_input.tokens == [10, 11, 12, 1]
    assert first.target_tokens == [11, 12, 1, 2]
    assert first.advantages == pytest.approx([0, 0, 1 / 5, 1 / 5])  # prompt positions carry nothing
    assert first.logprobs == [0, 0, -0.5, -0.5]
    assert data[1].loss_fn_inputs.advantages == pytest.approx([0, 0, -2 / 5, -2 / 5, -2 / 5])
    direct = policy_datum([7, 8], reply([9]), 0.25)
    assert direct.model_input.tokens == [7, 8] and direct.loss_fn_inputs.advantages == [0.0, 0.25]


def test_split_evenly_makes_parts_that_differ_by_at_most_one():
    assert split_evenly(list(range(7)), 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert split_evenly(list(range(2)), 4) == [[0], [1]]  # no empty part
    assert split_evenly([], 4) == [] and split_evenly(list(range(3)), 1) == [[0, 1, 2]]


def test_a_step_with_nothing_to_learn_takes_no_optimizer_step():
    reply = lambda reward: Reply("x", [1, 2], [-0.5, -0.5], reward, bool(reward))  # noqa: E731
    mixed = Group(Problem("p", "q", "1"), [10], [reply(1.0), reply(0.0)], sampled_at=3)
    alike = Group(Problem("p", "q", "1"), [10], [reply(1.0), reply(1.0)], sampled_at=4)
    steps = []
    for groups, trained_on in (([mixed], 3), ([alike], 4)):
        for g in groups:
            g.advantages = group_advantages([r.reward for r in g.replies])
        data, _ = step_data(groups)
        steps.append(step_metrics(groups, data, [[None] * len(d.model_input.tokens) for d in data], trained_on))
    assert [s["step"] for s in steps] == [4, 4] and [s["trained_replies"] for s in steps] == [2, 0]
    summary = epoch_summary(steps)
    assert summary["optimizer_steps"] == 1 and summary["trained_replies"] == 2


def test_step_metrics_report_ratios_clipping_spread_and_grad_norm_by_hand():
    reply = lambda reward, lps: Reply("x", [1] * len(lps), lps, reward, bool(reward))  # noqa: E731
    group = Group(Problem("p", "q", "1"), [10], [reply(1.0, [-1.0, -1.0]), reply(0.0, [-2.0])], sampled_at=0)
    group.advantages = group_advantages([r.reward for r in group.replies])
    data, _ = step_data([group])
    # Trainer logprobs per position (a one-token prompt has no position): ratios e^0.1, e^-0.5 | e^0.
    rows = [[-0.9, -1.5], [-2.0]]
    m = step_metrics([group], data, rows, trained_on=0, grad_norm=0.75)
    ratios = [math.exp(0.1), math.exp(-0.5), 1.0]
    assert m["ratio_mean"] == pytest.approx(sum(ratios) / 3)
    assert m["ratio_max"] == pytest.approx(math.exp(0.1))
    assert m["ratio_clipped"] == pytest.approx(1 / 3)  # e^-0.5 = 0.61 is outside [0.8, 1.2]
    assert m["kl_sample_train"] == pytest.approx(-(0.1 - 0.5 + 0.0) / 3)
    assert m["reward_std_in_group"] == pytest.approx(0.5) and m["grad_norm"] == 0.75


# ------------------------------------------------------------------- one step on a server
def _reply_logprobs(run, data) -> list[float]:
    """Each datum's summed logprob over its reply (the positions with an advantage)."""
    rows = run.forward(data, loss_fn="importance_sampling").result().logprobs
    return [sum(lp for lp, a in zip(row, d.loss_fn_inputs.advantages) if a) for row, d in zip(rows, data)]


def test_a_policy_gradient_step_raises_good_replies_and_lowers_bad_ones(make_server):
    problems = ARITHMETIC.load_problems("train", limit=2, seed=0)
    with make_server() as server, ez.ServiceClient(server.url) as client:
        run = client.create_training_run(lora_rank=4, seed=0)
        buffer = SampleBuffer(
            run,
            ARITHMETIC,
            scorers.VerifierScorer(ARITHMETIC, _coin),
            ez.SamplingParams(max_tokens=8, temperature=1.0),
            4,
            random.Random(0),
        )
        try:
            buffer.request(0, problems, sampled_at=0)
            groups = buffer.take(0)
        finally:
            buffer.close()
        for g in groups:
            g.advantages = group_advantages([r.reward for r in g.replies])
        data, tokens = step_data(groups)
        assert data, "the coin gave no group mixed rewards"
        before = _reply_logprobs(run, data)
        # On policy, the trainer's logprobs are the sampler's: the loss is -sum(advantage) at ratio 1.
        sampled = [sum(lp for lp, a in zip(d.loss_fn_inputs.logprobs, d.loss_fn_inputs.advantages) if a) for d in data]
        assert before == pytest.approx(sampled, abs=1e-3)
        fb = run.forward_backward(data, loss_fn="importance_sampling").result()
        expected = -sum(a for d in data for a in d.loss_fn_inputs.advantages)
        assert fb.loss == pytest.approx(expected, abs=1e-3)
        run.optim_step(ez.AdamParams(learning_rate=2e-2)).result()
        after = _reply_logprobs(run, data)
    signs = [1 if d.loss_fn_inputs.advantages[-1] > 0 else -1 for d in data]
    moved = [(a - b) * s for a, b, s in zip(after, before, signs)]
    assert sum(moved) > 0 and sum(m > 0 for m in moved) >= len(moved) * 0.75, moved


# ------------------------------------------------------------------------------ scorers
def test_verifier_scorer_and_judge_verdicts():
    problem = Problem("p", "What is 2 + 3?", "5")
    scorer = scorers.VerifierScorer(ARITHMETIC)
    assert scorer(problem, ["2 + 3 = 5. Answer: 5", "Answer: 6"]) == [1.0, 0.0]
    assert [scorers.verdict(t) for t in ("Yes.", " no", "Correct!", "It is incorrect", "maybe", "no, yes")] == [
        1.0,
        0.0,
        1.0,
        0.0,
        0.0,
        0.0,
    ]


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_model_dir):
    """A tiny random Qwen2 with a one-label classification head, and the Qwen2 tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from eztinker.tiny import copy_tokenizer

    out = tmp_path_factory.mktemp("reward-model")
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    copy_tokenizer(tiny_model_dir, out)
    return out


def test_reward_model_scorer_batches_like_one_at_a_time(tiny_reward_model):
    problem = ARITHMETIC.load_problems("test", limit=1, seed=0)[0]
    replies = ["Answer: 3", "It is a long way to the answer, but the answer is 12. Answer: 12", "no", "Answer: 7 " * 5]
    batched = scorers.RewardModelScorer(str(tiny_reward_model), ARITHMETIC, batch_size=4)(problem, replies)
    one_by_one = scorers.RewardModelScorer(str(tiny_reward_model), ARITHMETIC, batch_size=1)(problem, replies)
    assert len(batched) == 4 and len(set(batched)) == 4  # a real score per reply, not a constant
    assert batched == pytest.approx(one_by_one, abs=1e-4)  # padding does not change a reply's score


def test_scorer_choice_errors_name_the_flag(tmp_path):
    config = Config(scorer="reward-model")
    with pytest.raises(ValueError, match="--reward-model"):
        scorers.make_scorer(config, ARITHMETIC, service=None)
    with pytest.raises(ValueError, match="reward model .*nowhere"):
        scorers.make_scorer(Config(scorer="reward-model", reward_model=str(tmp_path / "nowhere")), ARITHMETIC, None)


def test_judge_scorer_asks_a_base_model_on_the_server(make_server):
    problem = Problem("p", "What is 2 + 3?", "5")
    with make_server() as server, ez.ServiceClient(server.url) as client:
        judge = scorers.JudgeScorer(client, model=None)
        rewards = judge(problem, ["Answer: 5", "Answer: 6", "Answer: 5"])
    assert len(rewards) == 3 and set(rewards) <= {0.0, 1.0}
    assert rewards[0] == rewards[2]  # greedy: the same reply gets the same verdict


# --------------------------------------------------------------------------- the recipe
def _config(url, tmp_path, **overrides) -> Config:
    options = dict(
        server_url=url,
        task="arithmetic",
        max_samples=6,
        num_candidates=4,
        groups_per_step=2,
        epochs=1,
        max_tokens=6,
        eval_size=2,
        micro_batch_size=4,
        substeps=1,
        learning_rate=1e-2,
        lora_rank=2,
        output_dir=tmp_path / "out",
        reward_fn=_coin,
    )
    options.update(overrides)
    return Config(**options)


def test_rl_writes_its_outputs_pipelined_and_resumes(make_server, tmp_path):
    with make_server() as server:
        first = main(_config(server.url, tmp_path, checkpoint=True, max_staleness=1))
        ref = first["epochs"][1]["checkpoint"]
        resumed = main(
            _config(server.url, tmp_path, checkpoint=True, epochs=2, resume_from=ref, max_staleness=0, substeps=2)
        )
        info = ez.ServiceClient(server.url).training_client(resumed["run_id"]).info()

    epoch1 = first["epochs"][1]
    steps = first["steps"]
    assert [e["epoch"] for e in first["epochs"]] == [0, 1] and epoch1["optimizer_steps"] == len(steps) == 3
    # Pipelined: step 1's samples come from the untrained adapter, later ones lag by one update.
    assert [s["staleness"] for s in steps] == [0, 1, 1]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert 0 <= s["mean_reward"] <= 1 and 0 <= s["mixed_groups"] <= 1 and s["entropy"] > 0
        assert s["kl_sample_train"] is None or abs(s["kl_sample_train"]) < 0.5
    assert {
        "test_accuracy",
        "test_strict_accuracy",
        "mean_reward",
        "mixed_groups",
        "kl_sample_train",
        "entropy",
        "reply_tokens",
        "staleness",
        "checkpoint",
    } <= set(epoch1)
    out = tmp_path / "out"
    rollouts = [json.loads(line) for line in (out / ROLLOUTS_FILE).read_text().splitlines()]
    assert len(rollouts) == 6 + 6  # every group of both runs (the resumed run appends)
    for row in rollouts:
        assert len(row["replies"]) == len(row["rewards"]) == len(row["advantages"]) == 4
        assert abs(sum(row["advantages"])) < 1e-3  # centred within the group
        assert row["rewards"] == [float(_coin(t, None)) for t in row["replies"]]
    assert (out / PLOT_FILE).stat().st_size > 1000
    assert resumed["resumed_from"] == ref and [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2]
    assert resumed["epochs"][1] == epoch1
    assert [s["staleness"] for s in resumed["steps"] if s["epoch"] == 2] == [0, 0, 0]  # the sequential loop
    # --substeps 2: a step with replies to train on takes two optimizer steps, each on half of them.
    epoch2 = [s for s in resumed["steps"] if s["epoch"] == 2]
    assert [s["optimizer_steps"] for s in epoch2] == [min(2, s["trained_replies"]) for s in epoch2]
    assert [s["step"] for s in epoch2] == [3 + sum(t["optimizer_steps"] for t in epoch2[: k + 1]) for k in range(3)]
    trained = sum(s["optimizer_steps"] for s in resumed["steps"])
    assert info.step == trained and info.restored_from == ref
    assert resumed["epochs"][2]["optimizer_steps"] == trained - 3
    assert json.loads((out / RESULTS_FILE).read_text())["epochs"] == resumed["epochs"]


def test_rl_ppo_with_a_time_budget_stops_between_steps(make_server, tmp_path):
    with make_server() as server:
        none = main(_config(server.url, tmp_path, time_budget_minutes=0.0, eval_size=1))
        some = main(
            _config(server.url, tmp_path / "b", loss_fn="ppo", epochs=1000, time_budget_minutes=0.1, eval_size=1)
        )
    assert none["steps"] == [] and "time budget" in none["stopped"]
    assert 0 < len(some["steps"]) and "time budget" in some["stopped"]
    assert some["epochs"][-1]["epoch"] < 1000
    assert "test_accuracy" in some["epochs"][-1]  # the final adapter is scored after the budget
    assert some["total_seconds"] < 6 + 15


def test_rl_stops_after_steps_with_nothing_to_learn(make_server, tmp_path):
    """A policy whose every reply is wrong (or right) gives groups without mixed rewards: such steps
    train nothing, and after --stop-after-empty-steps of them in a row the run ends, saying why."""
    with make_server() as server:
        stalled = main(
            _config(server.url, tmp_path, epochs=50, reward_fn=lambda text, problem: False, stop_after_empty_steps=3)
        )
    assert [s["optimizer_steps"] for s in stalled["steps"]] == [0, 0, 0]
    assert stalled["stopped"].startswith("3 steps in a row had no group with mixed rewards (mean reward 0.00)")
    assert stalled["epochs"][-1]["epoch"] == 1 and "test_accuracy" in stalled["epochs"][-1]


def test_rl_cli_bad_flags_are_one_line(tmp_path):
    from click.testing import CliRunner

    from eztinker.cli import app

    result = CliRunner().invoke(
        app, ["rl", "--scorer", "reward-model", "--server-url", "http://127.0.0.1:9", "--output-dir", str(tmp_path)]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    for flag, value in [("--num-candidates", "1"), ("--stop-after-empty-steps", "-1")]:
        result = CliRunner().invoke(app, ["rl", flag, value, "--output-dir", str(tmp_path)])
        assert result.exit_code == 2 and flag in result.output and "Traceback" not in result.output


def test_the_linear_schedule_falls_to_zero_over_steps_or_time_whichever_ends_first(tmp_path):
    from eztinker.recipes.rl import RL

    constant = RL(_config("http://unused", tmp_path, learning_rate=1e-3, lr_decay=0.5, lr_schedule="constant"))
    assert constant.learning_rate(1, 0.5) == pytest.approx(1e-3) and constant.learning_rate(3, 0.5) == 2.5e-4
    linear = RL(_config("http://unused", tmp_path, learning_rate=1e-3, lr_schedule="linear"))
    assert [linear.learning_rate(1, f) for f in (0.0, 0.25, 0.9)] == pytest.approx([1e-3, 7.5e-4, 1e-4], abs=1e-9)
    timed = RL(_config("http://unused", tmp_path, learning_rate=1e-3, lr_schedule="linear", time_budget_minutes=10))
    timed.budget.started -= 450  # three quarters of the budget gone, a tenth of the steps
    assert timed.learning_rate(1, 0.1) == pytest.approx(2.5e-4, rel=1e-3)
