"""The flagship recipe end to end: real server (tiny Qwen2), real SDK, shared GSM8K files.

A random tiny model is never right, so correctness is decided by reward functions injected
through the recipe's public `Config.reward_fn`; the verifier itself is tested in test_verify.py.
"""

from __future__ import annotations

import json

import pytest

import eztinker as ez
from eztinker.recipes.rejection_sft import (
    BUFFER_FILE,
    PLOT_FILE,
    RESULTS_FILE,
    Candidate,
    Config,
    RejectionSFT,
    main,
    trim_after_answer,
)


def _config(url, gsm8k_dir, tmp_path, **overrides) -> Config:
    options = dict(
        task="gsm8k",
        server_url=url,
        gsm8k_dir=gsm8k_dir,
        max_samples=4,
        num_candidates=2,
        epochs=1,
        max_tokens=6,
        eval_size=2,
        batch_size=2,
        micro_batch_size=1,
        learning_rate=1e-3,
        output_dir=tmp_path / "out",
    )
    options.update(overrides)
    return Config(**options)


def _run_info(url, run_id) -> ez.RunInfo:
    return ez.ServiceClient(url).training_client(run_id).info()


def test_outputs_have_the_documented_shapes_and_only_correct_candidates_train(gsm8k_dir, make_server, tmp_path):
    accepted_questions: set[str] = set()

    def reward(text, problem):  # "correct": every candidate of the first two training problems
        return problem.id in accepted_questions

    with make_server() as server:
        config = _config(server.url, gsm8k_dir, tmp_path, checkpoint=True, reward_fn=reward)
        recipe = RejectionSFT(config)
        train, _ = recipe.load_problems()
        accepted_questions.update(p.id for p in train[:2])
        results = recipe.run()
        info = _run_info(server.url, results["run_id"])

    out = tmp_path / "out"
    buffer = [json.loads(line) for line in (out / BUFFER_FILE).read_text().splitlines()]
    assert len(buffer) == 4
    for entry in buffer:
        assert set(entry) >= {"question", "gold", "candidates", "correct", "chosen", "epoch"}
        assert len(entry["candidates"]) == 2
        if entry["id"] in accepted_questions:
            assert entry["correct"] == [True, True] and entry["chosen"] in (0, 1)
        else:
            assert entry["chosen"] is None  # no correct candidate: skipped

    saved = json.loads((out / RESULTS_FILE).read_text())
    assert [e["epoch"] for e in saved["epochs"]] == [0, 1]
    epoch = saved["epochs"][1]
    assert epoch["trained_examples"] == 2
    assert epoch["rejection_quality"] == pytest.approx(1.0)  # 2 problems x 2 correct / 4 problems
    assert epoch["train_accuracy"] == pytest.approx(0.5)
    assert set(epoch["seconds"]) == {"sample", "train", "eval"}
    assert epoch["checkpoint"].endswith("/rejection_sft_epoch_1")
    assert saved["config"]["num_candidates"] == 2 and "api_key" not in saved["config"]
    # 2 selected examples, batch size 2 -> exactly one optimizer step, and the checkpoint holds it.
    assert info.step == 1
    assert [c.name for c in info.checkpoints] == ["rejection_sft_epoch_1"]
    assert (out / PLOT_FILE).stat().st_size > 1000
    # No test problem is ever "correct" here, so training did not beat the start: a tie keeps
    # the untrained model as the best, with no checkpoint to point to.
    assert (saved["best_epoch"], saved["best_checkpoint"]) == (0, None)


def test_nothing_is_trained_when_no_candidate_is_correct(gsm8k_dir, make_server, tmp_path):
    with make_server() as server:
        results = main(_config(server.url, gsm8k_dir, tmp_path, reward_fn=lambda text, problem: False))
        info = _run_info(server.url, results["run_id"])
    assert info.step == 0
    assert results["epochs"][1]["trained_examples"] == 0
    assert results["epochs"][1]["train_loss"] is None  # nothing trained: null, not NaN (not JSON)


def test_resume_from_an_epoch_checkpoint_continues_the_schedule(gsm8k_dir, make_server, tmp_path):
    always = lambda text, problem: True  # noqa: E731
    with make_server() as server:
        first = main(_config(server.url, gsm8k_dir, tmp_path, checkpoint=True, reward_fn=always))
        ref = first["epochs"][1]["checkpoint"]
        resumed = main(
            _config(server.url, gsm8k_dir, tmp_path, checkpoint=True, epochs=2, resume_from=ref, reward_fn=always)
        )
        info = _run_info(server.url, resumed["run_id"])
    assert resumed["run_id"] != first["run_id"]
    assert resumed["resumed_from"] == ref
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2]
    # Epoch 1's 4 examples in batches of 2 -> 2 steps restored, plus 2 steps in epoch 2.
    assert info.step == 4
    assert info.restored_from == ref


def test_selection_prefers_correct_then_formatted_then_likely():
    c = lambda correct, strict, lp: Candidate("x", correct, strict, lp)  # noqa: E731
    assert RejectionSFT.select([c(False, False, 0.0), c(False, True, 0.0)]) is None
    assert RejectionSFT.select([c(True, False, -0.1), c(True, True, -5.0), c(False, True, 0.0)]) == 1
    assert RejectionSFT.select([c(True, True, -3.0), c(True, True, -1.0)]) == 1


def test_trim_after_answer_drops_rambling():
    assert trim_after_answer("7 + 5 = 12\nAnswer: 12\nNow let us also", "Answer:") == "7 + 5 = 12\nAnswer: 12"
    assert trim_after_answer("so\n#### 1,000 dollars\nmore", "####") == "so\n#### 1,000 dollars"
    assert trim_after_answer("no answer here", "Answer:") == "no answer here"


def test_server_not_running_is_one_clear_line(tmp_path):
    from click.testing import CliRunner

    from eztinker.cli import app
    from eztinker.launcher import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["rsft", "--server-url", url, "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no EZTinker server at" in result.output and "eztinker server" in result.output
    assert "Traceback" not in result.output
