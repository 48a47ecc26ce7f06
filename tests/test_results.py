"""Typed command results: each kind's model reads the JSON that jobs were stored with before
results were typed (the REST API serves that JSON as is), and writes it back unchanged."""

from __future__ import annotations

import json

import pytest

from eztinker.backend.commands import ErrorCategory, Outcome
from eztinker.backend.results import (
    JOB_RESULTS,
    JobKind,
    Loaded,
    PromptScores,
    Samples,
    Saved,
    dump_result,
    parse_result,
    parse_result_as,
)
from eztinker.types import CheckpointInfo

# Results as the hand-built dicts of LocalBackend and the runner stored them (json.dumps).
OLD_ROWS: dict[JobKind, dict] = {
    JobKind.create_run: {"run_id": "run_1", "step": 3},
    JobKind.delete_run: {"deleted": "run_1"},
    JobKind.forward_backward: {"loss": 2.5, "num_tokens": 3, "logprobs": [[None, -1.0, -1.5], [[-0.5, -2.0]]]},
    JobKind.optim_step: {"step": 4, "grad_norm": 0.25, "learning_rate": 0.001},
    JobKind.sample: {
        "prompt_tokens": [[1, 2, 3]],
        "sequences": [
            [
                {
                    "text": "hi",
                    "tokens": [5, 6],
                    "logprobs": [-0.5, -0.25],
                    "stop_reason": "stop",
                    "top_logprobs": [[[5, -0.5], [7, -1.5]], [[6, -0.25], [8, -2.0]]],
                },
                {"text": "ho", "tokens": [9], "logprobs": [-3.0], "stop_reason": "length"},
            ]
        ],
        "prompt_logprobs": [[None, -1.25, -2.5]],
        "topk_prompt_logprobs": [[None, [[2, -1.25]], [[3, -2.5]]]],
        "target_prompt_logprobs": [[[-1.0, -4.0], []]],
        "prompt_alt_tokens": [{"tokens": [[4, 4], [2, 9]], "logprobs": [[-0.5, -0.5], [-1.0, -3.0]]}],
    },
    JobKind.score: {"scores": [{"mean_logprob": -1.5, "sum_logprob": -3.0, "num_tokens": 2}]},
    JobKind.score_prompts: {"prompt_logprobs": [[None, -1.0]], "topk_prompt_logprobs": [[None, [[7, -0.5]]]]},
    JobKind.save: {
        "run_id": "run_1",
        "name": "ckpt",
        "path": "checkpoints/run_1/ckpt",
        "step": 4,
        "created_at": "2026-12-07T06:00:00Z",
        "expires_at": None,
        "public": False,
    },
    JobKind.load: {"step": 4, "restored_from": "run_1/ckpt"},
}


def test_every_kind_has_a_result_model_and_an_old_row_to_read():
    assert set(JOB_RESULTS) == set(JobKind) == set(OLD_ROWS)


@pytest.mark.parametrize("kind", list(JobKind))
def test_a_result_stored_before_typing_reads_back_and_serialises_unchanged(kind):
    stored = json.dumps(OLD_ROWS[kind])
    result = parse_result(kind, stored)
    assert isinstance(result, JOB_RESULTS[kind])
    if kind is not JobKind.save:  # a save's record is written by the store itself (CheckpointInfo's JSON)
        assert json.loads(dump_result(result)) == OLD_ROWS[kind]


def test_samples_read_as_fields_and_leave_out_what_was_not_asked_for():
    samples = parse_result_as(Samples, "sample", json.dumps(OLD_ROWS[JobKind.sample]))
    first, second = samples.sequences[0]
    assert first.top_logprobs == [[(5, -0.5), (7, -1.5)], [(6, -0.25), (8, -2.0)]]
    assert second.top_logprobs is None and "top_logprobs" not in json.loads(dump_result(samples))["sequences"][0][1]
    assert samples.prompt_alt_tokens is not None and samples.prompt_alt_tokens[0].tokens == [[4, 4], [2, 9]]
    assert samples.sampled_tokens() == 3
    plain = Samples(prompt_tokens=[[1]], sequences=[[second]])
    assert set(json.loads(dump_result(plain))) == {"prompt_tokens", "sequences"}
    with pytest.raises(TypeError, match="not a Loaded"):
        parse_result_as(Loaded, "sample", json.dumps(OLD_ROWS[JobKind.sample]))


def test_a_non_finite_logprob_round_trips_as_json_did():
    scores = PromptScores(prompt_logprobs=[[None, float("-inf")]])
    text = dump_result(scores)
    assert text == json.dumps({"prompt_logprobs": [[None, float("-inf")]]})
    assert parse_result("score_prompts", text) == scores


def test_an_outcome_hands_out_its_value_only_as_its_kind():
    ok = Outcome(value=Saved(step=2))
    assert ok.result(Saved).step == 2 and ok.unwrap() == Saved(step=2)
    with pytest.raises(TypeError, match="Loaded"):
        ok.result(Loaded)
    failed = Outcome.failed("bad input", ErrorCategory.user)
    assert failed.error_category == "user" and failed.value is None
    with pytest.raises(ValueError, match="bad input"):
        failed.result(Saved)
    assert CheckpointInfo is JOB_RESULTS[JobKind.save]
