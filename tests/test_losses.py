"""The engine's gspo and stable_reinforce losses against their formulas on hand-computed cases,
and cross_entropy over [N, K] targets (top-k distillation) against its K one-target terms.
Tiny random Qwen2, CPU, no mocks: each loss's gradient is checked against cross_entropy with the
per-token weights the formula's derivative gives (same adapter, same weights)."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import CONVERSATIONS, adapter_grads, prompt_and_reply, rel_diff

from eztinker.engine import EngineError
from eztinker.types import AdamParams, Datum, ForwardBackwardRequest, LoraConfig, LossFnInputs, ModelInput

LORA = LoraConfig(rank=4, alpha=16)


def datum(tokens, **inputs) -> Datum:
    return Datum(model_input=ModelInput(tokens=tokens), loss_fn_inputs=LossFnInputs(**inputs))


@pytest.fixture()
def case(engine, tiny_base):
    """Two runs with identical weights ('loss' and 'probe'), one reply, and the probe's logprobs."""
    prompt, reply = prompt_and_reply(tiny_base.tokenizer, *CONVERSATIONS[0])
    tokens, targets = (prompt + reply)[:-1], (prompt + reply)[1:]
    for run_id in ("loss", "probe"):
        engine.create_run(run_id, LORA, seed=3)
        # One identical step so lora_B is nonzero and both runs agree on a non-base policy.
        engine.forward_backward(run_id, [datum(tokens, target_tokens=targets)])
        engine.optim_step(run_id, AdamParams(learning_rate=1e-2))
    current = engine.forward_backward("probe", [datum(tokens, target_tokens=targets)], forward_only=True).logprobs[0]
    return tokens, targets, len(prompt) - 1, torch.tensor(current, dtype=torch.float64)


def grads_of_weighted_ce(engine, tokens, targets, weights) -> torch.Tensor:
    """The 'probe' run's gradient of -sum(weights * logprob): a loss's gradient is this for the
    weights d loss / d logprob."""
    engine.forward_backward("probe", [datum(tokens, target_tokens=targets, weights=weights)])
    return adapter_grads(engine, "probe")


def test_gspo_equals_its_formula(engine, case):
    tokens, targets, start, p = case
    n = len(tokens)
    rng = torch.Generator().manual_seed(1)
    q = p - 0.3 * torch.rand(n, generator=rng, dtype=torch.float64)  # a slightly stale sampler
    advantages = torch.zeros(n, dtype=torch.float64)
    advantages[start:] = torch.tensor([(-1.0) ** i * (1 + i % 3) for i in range(n - start)])
    mask = torch.zeros(n, dtype=torch.float64)
    mask[start - 1 :] = 1.0  # the ratio also covers one position whose advantage is 0
    config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.05}

    result = engine.forward_backward(
        "loss",
        [
            datum(
                tokens,
                target_tokens=targets,
                logprobs=q.tolist(),
                advantages=advantages.tolist(),
                sequence_ratio_mask=mask.tolist(),
            )
        ],
        loss_fn="gspo",
        loss_fn_config=config,
    )
    s = math.exp(float(((p - q) * mask).sum() / mask.sum()))
    assert s > 1.05  # the case clips: positive advantages lose their gradient, negative ones keep it
    clipped = min(max(s, 0.8), 1.05)
    want = -sum(min(s * a, clipped * a) for a in advantages.tolist())
    assert result.loss == pytest.approx(want, rel=1e-5, abs=2e-5)  # float32 logprobs
    # d loss / d logprob_t = -A_t * s where the unclipped term is the minimum, 0 where the clip binds.
    weights = [a * s if s * a <= clipped * a else 0.0 for a in advantages.tolist()]
    assert any(w == 0 for w in weights[start:]) and any(w != 0 for w in weights[start:])
    assert rel_diff(adapter_grads(engine, "loss"), grads_of_weighted_ce(engine, tokens, targets, weights)) < 1e-4


def test_stable_reinforce_equals_its_formula(engine, case):
    tokens, targets, start, p = case
    n = len(tokens)
    q = p.clone()
    q[start::2] -= 2.0  # ratio e^2 = 7.4 > max_weight 2: truncated
    q[start + 1 :: 2] += 0.5  # ratio e^-0.5 = 0.61: kept as it is
    advantages = torch.zeros(n, dtype=torch.float64)
    advantages[start:] = 1.5
    advantages[start + 2] = -1.0
    result = engine.forward_backward(
        "loss",
        [datum(tokens, target_tokens=targets, logprobs=q.tolist(), advantages=advantages.tolist())],
        loss_fn="stable_reinforce",
    )
    weight = torch.exp(p - q).clamp(max=2.0)
    assert result.loss == pytest.approx(float(-(weight * p * advantages).sum()), rel=1e-5)
    assert (
        rel_diff(
            adapter_grads(engine, "loss"), grads_of_weighted_ce(engine, tokens, targets, (weight * advantages).tolist())
        )
        < 1e-4
    )


def test_stable_reinforce_on_policy_has_the_importance_sampling_gradient(engine, case):
    tokens, targets, start, p = case
    advantages = [0.0] * start + [1.0, -0.5] * ((len(tokens) - start) // 2) + [1.0] * ((len(tokens) - start) % 2)
    args = dict(target_tokens=targets, logprobs=p.tolist(), advantages=advantages)
    engine.forward_backward("loss", [datum(tokens, **args)], loss_fn="stable_reinforce")
    engine.forward_backward("probe", [datum(tokens, **args)], loss_fn="importance_sampling")
    assert rel_diff(adapter_grads(engine, "loss"), adapter_grads(engine, "probe")) < 1e-4


@pytest.mark.parametrize("fast_head", [True, False])
def test_cross_entropy_over_k_targets_is_the_sum_of_its_one_target_terms(engine, tiny_base, fast_head):
    prompt, reply = prompt_and_reply(tiny_base.tokenizer, *CONVERSATIONS[2])
    tokens = (prompt + reply)[:-1]
    n, k = len(tokens), 3
    rng = torch.Generator().manual_seed(5)
    targets_NK = torch.randint(0, tiny_base.vocab_size, (n, k), generator=rng)
    weights_NK = torch.rand(n, k, generator=rng)
    weights_NK[: len(prompt) - 1] = 0.0  # no loss on the prompt
    weights_NK[-1, 1] = 0.0
    for run_id in ("multi", "single"):
        engine.create_run(run_id, LORA, seed=7)
    if not fast_head:
        engine.forward._head = None  # the autograd path through full logits
    engine.logits_chunk = 4  # several chunks
    multi = engine.forward_backward(
        "multi", [datum(tokens, target_tokens=targets_NK.tolist(), weights=weights_NK.tolist())]
    )
    singles = [
        datum(tokens, target_tokens=targets_NK[:, j].tolist(), weights=weights_NK[:, j].tolist()) for j in range(k)
    ]
    single = engine.forward_backward("single", singles)
    assert multi.loss == pytest.approx(single.loss, rel=1e-5)
    assert rel_diff(adapter_grads(engine, "multi"), adapter_grads(engine, "single")) < 1e-5
    # Logprobs come back [N, K]: position t, slot j is the logprob of targets[t][j].
    full = engine.forward_backward("single", singles, forward_only=True, all_logprobs=True)
    got = engine.forward_backward(
        "multi",
        [datum(tokens, target_tokens=targets_NK.tolist(), weights=weights_NK.tolist())],
        forward_only=True,
        all_logprobs=True,
    )
    assert len(got.logprobs[0]) == n and all(len(row) == k for row in got.logprobs[0])
    for j in range(k):
        assert [row[j] for row in got.logprobs[0]] == pytest.approx(full.logprobs[j], rel=1e-5, abs=1e-6)
    # A [N, K] datum and a one-target datum share a batch: each gets its own shape back.
    mixed = engine.forward_backward(
        "multi",
        [singles[0], datum(tokens, target_tokens=targets_NK.tolist(), weights=weights_NK.tolist())],
        forward_only=True,
    )
    assert not isinstance(mixed.logprobs[0][-1], list) and len(mixed.logprobs[1][-1]) == k
    assert mixed.loss == pytest.approx(
        single.loss + engine.forward_backward("single", [singles[0]], forward_only=True).loss, rel=1e-5
    )


def test_inputs_each_loss_requires_are_refused_by_name():
    tokens = [1, 2, 3]
    rl = dict(target_tokens=[2, 3, 4], logprobs=[0.0] * 3, advantages=[1.0] * 3)
    with pytest.raises(ValueError, match=r"data\[0\].loss_fn_inputs.sequence_ratio_mask is required by gspo"):
        ForwardBackwardRequest(data=[datum(tokens, **rl)], loss_fn="gspo")
    with pytest.raises(ValueError, match="only cross_entropy takes several targets"):
        ForwardBackwardRequest(data=[datum(tokens, **{**rl, "target_tokens": [[1, 2]] * 3})], loss_fn="ppo")
    with pytest.raises(ValueError, match="sequence_ratio_mask is only taken by gspo"):
        ForwardBackwardRequest(data=[datum(tokens, **rl, sequence_ratio_mask=[1.0] * 3)], loss_fn="ppo")
    with pytest.raises(ValueError, match=r"weights must have the shape of target_tokens \(\[N, 2\]\)"):
        datum(tokens, target_tokens=[[1, 2]] * 3, weights=[1.0] * 3)
    with pytest.raises(ValueError, match="rectangular"):
        datum(tokens, target_tokens=[[1, 2], [1], [3, 4]])


def test_stable_reinforce_refuses_a_non_positive_cap(engine, case):
    tokens, targets, start, p = case
    with pytest.raises(EngineError, match="max_weight must be positive"):
        engine.forward_backward(
            "loss",
            [datum(tokens, target_tokens=targets, logprobs=p.tolist(), advantages=[1.0] * len(tokens))],
            loss_fn="stable_reinforce",
            loss_fn_config={"max_weight": 0.0},
        )
