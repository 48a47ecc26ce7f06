"""DPO and the SDK's forward_backward_custom: the loss and its gradient against a hand
computation, the custom-loss gradient against autograd in-process, and the recipe end to end on
the tiny Qwen2 through a real server (pairs from a file; pairs from the run's own samples, with
resume)."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
from support import FAST, PROMPT, REPLY

import eztinker as ez
from eztinker.recipes.dpo import (
    BUFFER_FILE,
    PLOT_FILE,
    RESULTS_FILE,
    Config,
    dpo_loss_fn,
    dpo_terms,
    main,
    read_pairs,
)


# ---------------------------------------------------------------------------- the loss by hand
def test_dpo_loss_rewards_and_gradient_match_a_hand_computation():
    beta = 0.5
    pc, pr = torch.tensor([-3.0, -1.0], requires_grad=True), torch.tensor([-2.0, -4.0], requires_grad=True)
    rc, rr = torch.tensor([-2.5, -2.0]), torch.tensor([-2.5, -3.0])
    terms = dpo_terms(pc, pr, rc, rr, beta)
    # pair 0: chosen reward 0.5*(-0.5) = -0.25, rejected 0.5*(0.5) = 0.25, margin -0.5
    # pair 1: chosen 0.5*(1) = 0.5, rejected 0.5*(-1) = -0.5, margin 1
    assert terms["chosen_reward"].tolist() == pytest.approx([-0.25, 0.5])
    assert terms["rejected_reward"].tolist() == pytest.approx([0.25, -0.5])
    assert terms["margin"].tolist() == pytest.approx([-0.5, 1.0])
    assert terms["correct"].tolist() == [0.0, 1.0]
    hand_loss = [math.log1p(math.exp(0.5)), math.log1p(math.exp(-1.0))]
    assert terms["loss"].tolist() == pytest.approx(hand_loss)
    terms["loss"].sum().backward()
    # d/d pc of -log sigmoid(m) = -beta * sigmoid(-m); d/d pr = +beta * sigmoid(-m)
    sig = [1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(1.0))]  # sigmoid(-m)
    assert pc.grad.tolist() == pytest.approx([-beta * s for s in sig])
    assert pr.grad.tolist() == pytest.approx([beta * s for s in sig])


def test_dpo_loss_fn_sums_reply_tokens_and_averages_over_the_batch():
    # chosen reply: the last 2 positions, rejected: the last 1 (weights mark the reply)
    chosen = ez.Datum(
        model_input=ez.ModelInput(tokens=[1, 2, 3]),
        loss_fn_inputs=ez.LossFnInputs(target_tokens=[2, 3, 4], weights=[0, 1, 1]),
    )
    rejected = ez.Datum(
        model_input=ez.ModelInput(tokens=[1, 2]), loss_fn_inputs=ez.LossFnInputs(target_tokens=[2, 5], weights=[0, 1])
    )
    logprobs = [torch.tensor([-9.0, -1.0, -2.0], requires_grad=True), torch.tensor([-9.0, -1.5], requires_grad=True)]
    loss, metrics = dpo_loss_fn([-2.0, -2.0], beta=1.0, normaliser=4)([chosen, rejected], logprobs)
    margin = (-3.0 - -2.0) - (-1.5 - -2.0)  # -1.5
    assert loss.item() == pytest.approx(math.log1p(math.exp(-margin)) / 4)
    assert metrics["margin"] == pytest.approx(margin) and metrics["correct"] == 0.0
    loss.backward()
    g = 1 / (1 + math.exp(margin)) / 4  # sigmoid(-margin) / normaliser
    assert logprobs[0].grad.tolist() == pytest.approx([0.0, -g, -g])  # prompt positions get none
    assert logprobs[1].grad.tolist() == pytest.approx([0.0, g])


def test_dpo_loss_fn_sft_term_adds_the_chosen_replys_mean_nll():
    chosen = ez.Datum(
        model_input=ez.ModelInput(tokens=[1, 2, 3]),
        loss_fn_inputs=ez.LossFnInputs(target_tokens=[2, 3, 4], weights=[0, 1, 1]),
    )
    rejected = ez.Datum(
        model_input=ez.ModelInput(tokens=[1, 2]), loss_fn_inputs=ez.LossFnInputs(target_tokens=[2, 5], weights=[0, 1])
    )
    logprobs = [torch.tensor([-9.0, -1.0, -2.0], requires_grad=True), torch.tensor([-9.0, -1.5], requires_grad=True)]
    loss, metrics = dpo_loss_fn([-2.0, -2.0], beta=1.0, normaliser=2, sft_weight=0.5)([chosen, rejected], logprobs)
    margin = -1.5
    dpo = math.log1p(math.exp(-margin))
    assert metrics["loss"] == pytest.approx(dpo) and metrics["chosen_nll"] == pytest.approx(1.5)  # (1 + 2) / 2 tokens
    assert loss.item() == pytest.approx((dpo + 0.5 * 1.5) / 2)
    loss.backward()
    g = 1 / (1 + math.exp(margin)) / 2
    sft = 0.5 / 2 / 2  # weight / tokens / normaliser, on each chosen reply token
    assert logprobs[0].grad.tolist() == pytest.approx([0.0, -g - sft, -g - sft])
    assert logprobs[1].grad.tolist() == pytest.approx([0.0, g])  # the rejected reply gets no SFT pull


def test_dpo_loss_fn_length_normalized_divides_each_log_ratio_by_its_tokens():
    chosen = ez.Datum(
        model_input=ez.ModelInput(tokens=[1, 2, 3]),
        loss_fn_inputs=ez.LossFnInputs(target_tokens=[2, 3, 4], weights=[0, 1, 1]),
    )
    rejected = ez.Datum(
        model_input=ez.ModelInput(tokens=[1, 2]), loss_fn_inputs=ez.LossFnInputs(target_tokens=[2, 5], weights=[0, 1])
    )
    logprobs = [torch.tensor([-9.0, -1.0, -2.0], requires_grad=True), torch.tensor([-9.0, -1.5], requires_grad=True)]
    loss, metrics = dpo_loss_fn([-2.0, -2.0], beta=2.0, normaliser=1, length_normalize=True)(
        [chosen, rejected], logprobs
    )
    margin = 2.0 * ((-3.0 - -2.0) / 2 - (-1.5 - -2.0) / 1)  # per-token log-ratios: -0.5 and 0.5
    assert metrics["margin"] == pytest.approx(margin) and loss.item() == pytest.approx(math.log1p(math.exp(-margin)))
    loss.backward()
    g = 2.0 / (1 + math.exp(margin))  # beta * sigmoid(-margin)
    assert logprobs[0].grad.tolist() == pytest.approx([0.0, -g / 2, -g / 2])  # each chosen token: 1/2 of it
    assert logprobs[1].grad.tolist() == pytest.approx([0.0, g])


# -------------------------------------------------------------- forward_backward_custom
def _nonlinear_loss(data, logprobs):
    """A loss no server loss computes: squares and a log-sum-exp of weighted logprob sums."""
    sums = torch.stack([(lp * torch.tensor(d.loss_fn_inputs.weights)).sum() for d, lp in zip(data, logprobs)])
    loss = (sums**2).mean() * 0.01 + torch.logsumexp(sums, 0) + logprobs[0][-1] * 3
    return loss, {"first_sum": float(sums[0])}


def test_forward_backward_custom_gradient_equals_autograd_in_process(make_server):
    data = [ez.datum_from_tokens(PROMPT, REPLY), ez.datum_from_tokens([11, 12], [13, 14, 15, 16, 17], weight=0.5)]
    with make_server() as server, ez.ServiceClient(server.url) as client:
        run = client.create_training_run(lora_rank=2, seed=3)
        run.forward_backward(data).result()
        run.optim_step(FAST).result()  # lora_B nonzero: every adapter weight has a gradient
        result = run.forward_backward_custom(data, _nonlinear_loss).result()
        engine = server.service.backend.engine(server.service.default_model)
        params = engine._run(run.run_id).params
        server_grads = [p.grad.detach().clone() for p in params]
        # The same loss by autograd through the model's full logits, in this process.
        for p in params:
            p.grad = None
        engine.adapters.activate(run.run_id)
        logprobs = []
        with torch.enable_grad():
            for d in data:
                logits = engine.adapters.peft(input_ids=torch.tensor([d.model_input.tokens])).logits[0]
                targets = torch.tensor(d.loss_fn_inputs.target_tokens)
                logprobs.append(torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0])
            want_loss, want_metrics = _nonlinear_loss(data, logprobs)
            want_loss.backward()
        run.delete()
    assert isinstance(result, ez.CustomLossResult)
    assert result.loss == pytest.approx(want_loss.item(), rel=1e-5)
    assert result.metrics["first_sum"] == pytest.approx(want_metrics["first_sum"], rel=1e-5)
    assert [len(r) for r in result.logprobs] == [len(d.model_input.tokens) for d in data]
    got, want = torch.cat([g.flatten() for g in server_grads]), torch.cat([p.grad.flatten() for p in params])
    assert want.abs().sum() > 0
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_forward_gives_every_logprob_and_leaves_the_run_untouched(make_server):
    datum = ez.datum_from_tokens(PROMPT, REPLY)
    with make_server() as server, ez.ServiceClient(server.url) as client:
        run = client.create_training_run()
        first = run.forward([datum]).result()
        run.optim_step(FAST).result()  # no gradient was accumulated: nothing moves
        again = run.forward([datum]).result()
    assert all(v is not None for v in first.logprobs[0])  # prompt positions too
    assert again.logprobs == first.logprobs
    assert first.loss == pytest.approx(-sum(first.logprobs[0][len(PROMPT) - 1 :]), rel=1e-5)


# ------------------------------------------------------------------------- the recipe
def _write_pairs(path, count: int = 4):
    rows = [
        {"prompt": f"Say a colour, number {i}.", "chosen": f"Blue, blue {i}.", "rejected": f"No {i}!"}
        for i in range(count)
    ]
    rows[0]["prompt"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _config(url, tmp_path, **overrides) -> Config:
    options = dict(
        server_url=url,
        task="arithmetic",
        max_samples=4,
        num_candidates=4,
        epochs=1,
        max_tokens=6,
        eval_size=2,
        batch_size=2,
        micro_batch_size=1,
        learning_rate=1e-2,
        beta=0.5,
        output_dir=tmp_path / "out",
    )
    options.update(overrides)
    return Config(**options)


def test_dpo_on_a_pairs_file_lowers_the_loss_and_widens_the_margin(make_server, tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    with make_server() as server:
        results = main(
            _config(server.url, tmp_path, pairs_file=pairs, eval_size=0, epochs=3, batch_size=4, micro_batch_size=2)
        )
        runs = ez.ServiceClient(server.url).list_runs()
    epochs = results["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]  # no test problems: no epoch 0
    first, last = epochs[0], epochs[-1]
    assert first["pairs"] == 4 and first["optimizer_steps"] == 1
    # The first step's policy is the reference: loss log 2, margin 0, rewards 0.
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["reward_margin"] == pytest.approx(0, abs=1e-4)
    assert last["dpo_loss"] < first["dpo_loss"] - 0.05
    assert last["reward_margin"] > first["reward_margin"] + 0.1
    assert last["reward_accuracy"] == 1.0
    assert last["chosen_reward"] > last["rejected_reward"]
    out = tmp_path / "out"
    assert json.loads((out / RESULTS_FILE).read_text())["epochs"] == epochs
    assert (out / PLOT_FILE).stat().st_size > 1000
    assert [r.id for r in runs] == [results["run_id"]]  # the reference run was removed


def test_dpo_on_buffer_pairs_writes_its_outputs_and_resumes(make_server, tmp_path):
    def reward(text, problem):  # a random model is never right: a stable coin per reply
        return zlib.crc32(text.encode()) % 2 == 0

    with make_server() as server:
        first = main(_config(server.url, tmp_path, checkpoint=True, reward_fn=reward))
        ref = first["epochs"][1]["checkpoint"]
        resumed = main(_config(server.url, tmp_path, checkpoint=True, epochs=2, resume_from=ref, reward_fn=reward))
        client = ez.ServiceClient(server.url)
        info = client.training_client(resumed["run_id"]).info()
        runs = {r.id for r in client.list_runs()}

    out = tmp_path / "out"
    buffer = [json.loads(line) for line in (out / BUFFER_FILE).read_text().splitlines()]
    assert [b["epoch"] for b in buffer] == [1] * 4 + [2] * 4  # the resumed run appended its epoch
    for entry in buffer:
        assert len(entry["candidates"]) == 4
        if entry["chosen"] is None:
            assert entry["rejected"] is None and len(set(entry["correct"])) == 1  # all right or all wrong
        else:
            assert entry["correct"][entry["chosen"]] and not entry["correct"][entry["rejected"]]
    epoch1 = first["epochs"][1]
    assert epoch1["pairs"] == sum(b["chosen"] is not None for b in buffer[:4]) > 0
    assert epoch1["optimizer_steps"] == math.ceil(epoch1["pairs"] / 2)
    assert set(epoch1["seconds"]) == {"sample", "reference", "train", "eval"}
    assert {
        "test_accuracy",
        "test_strict_accuracy",
        "test_lenient_accuracy",
        "reward_margin",
        "reward_accuracy",
        "chosen_reward",
        "rejected_reward",
        "dpo_loss",
        "train_accuracy",
    } <= set(epoch1)
    assert (out / PLOT_FILE).stat().st_size > 1000
    assert resumed["resumed_from"] == ref and resumed["run_id"] != first["run_id"]
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2]
    assert resumed["epochs"][1] == epoch1  # kept from the first run's results
    assert info.step == epoch1["optimizer_steps"] + resumed["epochs"][2]["optimizer_steps"]
    assert info.restored_from == ref
    assert runs == {first["run_id"], resumed["run_id"]}  # both reference runs removed


def test_a_time_budget_stops_before_the_next_epoch(make_server, tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl", count=2)
    with make_server() as server:
        results = main(_config(server.url, tmp_path, pairs_file=pairs, eval_size=0, epochs=5, time_budget_minutes=0.0))
    assert results["epochs"] == [] and "time budget" in results["stopped"]


def test_bad_pairs_files_are_one_line_naming_line_and_field(tmp_path):
    from click.testing import CliRunner

    from eztinker.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "hi", "chosen": "a"})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing 'rejected'"):
        read_pairs(bad)
    bad.write_text(
        json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}) + "\n"
    )
    with pytest.raises(ValueError, match=r":1: 'prompt' must be text or chat messages"):
        read_pairs(bad)
    result = CliRunner().invoke(app, ["dpo", "--pairs-file", str(bad), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "'prompt' must be text" in result.output and "Traceback" not in result.output


def test_eval_every_skips_middle_epochs_but_scores_the_last(make_server, tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl", count=2)
    with make_server() as server:
        results = main(_config(server.url, tmp_path, pairs_file=pairs, epochs=3, eval_every=5))
    assert ["test_accuracy" in e for e in results["epochs"]] == [True, False, False, True]
    assert results["best_epoch"] in (0, 3)
