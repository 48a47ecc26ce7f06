"""tinker-cookbook 0.6.1's true_thinking_score recipe (`run_small_experiment.main`), unmodified, against
a real `eztinker server` serving its model `Qwen/Qwen3.5-4B` (a module constant) from a hand-set tiny
Qwen2 (tests/hand_set.py) of its own: the other cookbook tests' chat model holds that name there, and
its table gives no answer a measurable probability.

This model's next token depends on the current one only, so its answers are known: greedily it thinks
"So x=3" (one reasoning step, with a number the recipe perturbs) and stops; after the recipe's
early-exit cue "\\boxed{" it writes 54} with probability 0.8 x 0.9 x 1 = 0.72, 2500} with
0.2 x 1 x 0.1 x 0.5 x 0.5 = 0.005 and 5/14} with next to none. As it ignores the context, perturbing
the step or what precedes it changes nothing: every step's TTS is 0 (decorative).

What the recipe measures is one token off that: tts.compute_early_exit_confidence sums
`logprobs[answer_start - 1 : answer_start - 1 + len(answer)]`, but the SDK's compute_logprobs gives
token i's logprob at index i (its docstring sums `logprobs[-len(completion):]`), so the sum is
P("{" | "ed") and the answer's tokens but its last ("}") ("\\boxed{" is "\\", "box", "ed", "{" in the
hand-set model's trimmed vocabulary). The table makes "{" certain after "ed", so the measured
confidences are 0.72, 0.2 x 1 x 0.1 x 0.5 = 0.01 and next to none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import pytest

pytest.importorskip("tinker_cookbook", reason="needs tinker-cookbook (scripts/setup.sh installs it)")
from hand_set import hand_set_model  # noqa: E402
from recipe_runs import RecipeTimes, offline_cookbook, recipe_server  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

MODEL = "Qwen/Qwen3.5-4B"
TIMES = RecipeTimes()
# After Qwen3.5's thinking generation prompt (it ends in "<think>\n"): "So x=3", then the answers.
THINKER_DEFAULT = {"<|im_end|>": 1.0}
THINKER_CHAIN = {
    "\n": {"So": 1.0},
    "ed": {"{": 1.0},  # the cue's "\\boxed{" ends in "ed", "{"
    "So": {" x": 1.0},
    " x": {"=": 1.0},
    "=": {"3": 1.0},
    "3": {"<|im_end|>": 1.0},
    "{": {"5": 0.8, "2": 0.2},
    "5": {"4": 0.9, "0": 0.1},
    "4": {"}": 1.0},
    "2": {"5": 1.0},
    "0": {"0": 0.5, "}": 0.5},
}


@pytest.fixture(scope="module")
def thinker(tmp_path_factory) -> Path:
    return hand_set_model(tmp_path_factory.mktemp("thinker"), THINKER_DEFAULT, THINKER_CHAIN, ("<think>", "</think>"))


@pytest.fixture(scope="module")
def server(thinker, tmp_path_factory):
    root = tmp_path_factory.mktemp("tts-server")
    # the experiment's CoT may run to 2048 tokens (the server's default bound is 1024)
    with recipe_server(root, [f"{MODEL}={thinker}"], ["--max-new-tokens", "2048"]) as running:
        yield running


def test_true_thinking_score_finds_every_step_of_a_context_free_model_decorative(
    server, thinker, tmp_path, monkeypatch, caplog
):
    from tinker_cookbook.recipes.true_thinking_score import run_small_experiment as experiment

    offline_cookbook(monkeypatch, server.url, {MODEL: AutoTokenizer.from_pretrained(thinker)})
    monkeypatch.setenv("TINKER_COOKBOOK_RUNS_DIR", str(tmp_path / "runs"))
    caplog.set_level(logging.INFO, logger="tinker_cookbook.recipes.true_thinking_score.tts")
    assert experiment.MODEL_NAME == MODEL and [p["answer"] for p in experiment.PROBLEMS] == ["54", "2500", "5/14"]

    TIMES.timed("true_thinking_score", lambda: asyncio.run(experiment.main()))
    TIMES.report()
    results = json.loads((tmp_path / "runs" / "tts-experiment" / "tts_results.json").read_text())
    problems = results["problems"]
    # The experiment catches a problem's exception and records it: none failed.
    assert all("error" not in p for p in problems), problems
    # Greedy decoding followed the table: one step ("So x=3") per problem, with a number to perturb.
    assert [p["n_steps"] for p in problems] == [1, 1, 1], problems
    assert all(p["per_step_tts"] == [0.0] and p["frac_decorative"] == 1.0 for p in problems), problems
    assert results["aggregate"]["mean_tts"] == 0 and results["aggregate"]["frac_decorative"] == 1.0
    # "Correct" is P(answer | full CoT) > 0.5: only 54's 0.72.
    assert [p["model_correct"] for p in problems] == [True, False, False], problems
    # The four conditions' confidences, as the recipe logs them: the table's, the same in each.
    confidences = [
        [float(v) for v in match]
        for match in re.findall(r"S1C1=([\d.]+) S0C1=([\d.]+) S1C0=([\d.]+) S0C0=([\d.]+)", caplog.text)
    ]
    assert len(confidences) == 3, caplog.text
    for row, expected in zip(confidences, [0.72, 0.01, 0.0], strict=True):
        assert all(v == row[0] for v in row) and row[0] == pytest.approx(expected, rel=0.2, abs=1e-4), row
    assert "Traceback" not in server.log(), server.log()[-3000:]
