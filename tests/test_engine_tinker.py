"""What the Tinker protocol asks of the engine, on the tiny random Qwen2: the RL losses and their
config, forward-only passes, logprobs at every position. CPU only, offline, no mocks of the model."""

from __future__ import annotations

import random

import pytest
import torch

from eztinker.engine import EngineError
from eztinker.types import Datum, LoraConfig, LossFnInputs, ModelInput

LORA = LoraConfig(rank=4, alpha=16)
DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, "beta": 0.05}


# ----------------------------------------------------------------------------------- helpers
def random_tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(300, 100_000) for _ in range(n)]


def twin_runs(engine, *names: str) -> None:
    """Runs with one identical random adapter (lora_B nonzero, so every LoRA tensor has a gradient)."""
    for name in names:
        engine.create_run(name, LORA)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in engine._runs[name].params:
                param.normal_(0.0, 0.05, generator=generator)


def model_logprobs(engine, run_id: str, tokens: list[int]) -> torch.Tensor:
    """[T, V] log-softmax of the model's own logits (through peft) at every position."""
    engine._activate(run_id)
    logits = engine._peft(input_ids=torch.tensor([tokens])).logits[0]
    return logits.float().log_softmax(-1)


def make_data(engine, run_id: str, loss_fn: str) -> list[Datum]:
    """Two examples of different lengths; signed weights or advantages, some zero; sampler logprobs
    near the current ones, so that ratios fall on both sides of the clip thresholds."""
    rng = random.Random(0)
    data = []
    for n in (9, 14):
        tokens, targets = random_tokens(n, rng), random_tokens(n, rng)
        signed = [0.0 if i % 4 == 0 else rng.choice([-1.5, -0.5, 0.7, 2.0]) for i in range(n)]
        if loss_fn == "cross_entropy":
            inputs = LossFnInputs(target_tokens=targets, weights=signed)
        else:
            with torch.no_grad():
                current = model_logprobs(engine, run_id, tokens).gather(-1, torch.tensor(targets)[:, None])[:, 0]
            sampler = [lp + rng.uniform(-0.6, 0.6) for lp in current.tolist()]
            inputs = LossFnInputs(target_tokens=targets, logprobs=sampler, advantages=signed)
        data.append(Datum(model_input=ModelInput(tokens=tokens), loss_fn_inputs=inputs))
    return data


def formula(loss_fn: str, config: dict, lp, datum: Datum) -> torch.Tensor:
    """SPEC section 7, written out: the summed loss over the positions with nonzero weight/advantage."""
    c = {**DEFAULTS, **config}
    inputs = datum.loss_fn_inputs
    if loss_fn == "cross_entropy":
        w = torch.tensor(inputs.weights)
        return -(lp * w)[w != 0].sum()
    q, a = torch.tensor(inputs.logprobs), torch.tensor(inputs.advantages)
    lp, q, a = lp[a != 0], q[a != 0], a[a != 0]
    ratio = torch.exp(lp - q)
    lo, hi = c["clip_low_threshold"], c["clip_high_threshold"]
    terms = {
        "importance_sampling": lambda: ratio * a,
        "ppo": lambda: torch.minimum(ratio * a, torch.clamp(ratio, lo, hi) * a),
        "cispo": lambda: torch.clamp(ratio.detach(), lo, hi) * lp * a,
        "dro": lambda: lp * a - 0.5 * c["beta"] * (lp - q) ** 2,
    }
    return -terms[loss_fn]().sum()


def autograd_loss(engine, run_id: str, data: list[Datum], loss_fn: str, config: dict) -> float:
    """The loss through full logits and plain autograd; its gradient accumulates into the run."""
    total = 0
    for datum in data:
        targets = torch.tensor(datum.loss_fn_inputs.target_tokens)
        lp = model_logprobs(engine, run_id, datum.model_input.tokens).gather(-1, targets[:, None])[:, 0]
        total = total + formula(loss_fn, config, lp, datum)
    total.backward()
    return float(total)


def grads(engine, run_id: str) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in engine._runs[run_id].params])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same_logprobs(got: list[list], want: list[list], abs: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert [x is None for x in g] == [x is None for x in w]
        assert [x for x in g if x is not None] == pytest.approx([x for x in w if x is not None], abs=abs)


def use_autograd_head(engine) -> None:
    """As for a model whose output head the engine cannot apply itself: the autograd path."""
    engine._output_head()
    engine._head = None


# ------------------------------------------------------------------------------------ losses
LOSS_CASES = [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
    ("cispo", {}),
    ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.1}),
    ("dro", {}),
    ("dro", {"beta": 2.0}),
]


@pytest.mark.parametrize("path", ["hand_written", "autograd"])
@pytest.mark.parametrize("loss_fn, config", LOSS_CASES)
def test_loss_and_gradient_equal_the_formula_through_plain_autograd(engine, loss_fn, config, path):
    twin_runs(engine, "engine", "reference")
    data = make_data(engine, "reference", loss_fn)
    if path == "autograd":
        use_autograd_head(engine)
    engine.logits_chunk = 5  # several chunks per example
    result = engine.forward_backward("engine", data, loss_fn, loss_fn_config=config or None)
    want = autograd_loss(engine, "reference", data, loss_fn, config)

    assert result.loss == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert result.num_tokens == sum(i % 4 != 0 for d in data for i in range(len(d.model_input.tokens)))
    assert rel_diff(grads(engine, "engine"), grads(engine, "reference")) < 1e-4
    if config:  # the config is really used: the defaults give another loss
        with torch.no_grad():
            lps = [model_logprobs(engine, "reference", d.model_input.tokens)
                   .gather(-1, torch.tensor(d.loss_fn_inputs.target_tokens)[:, None])[:, 0] for d in data]
        default = sum(float(formula(loss_fn, {}, lp, d)) for lp, d in zip(lps, data))
        assert default != pytest.approx(want, rel=1e-3)


def test_ppo_and_cispo_default_thresholds_are_0_8_and_1_2(engine):
    twin_runs(engine, "a")
    data = make_data(engine, "a", "ppo")
    for loss_fn in ("ppo", "cispo"):
        implicit = engine.forward_backward("a", data, loss_fn, forward_only=True).loss
        explicit = engine.forward_backward("a", data, loss_fn, forward_only=True,
                                           loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
        assert implicit == explicit.loss


@pytest.mark.parametrize("loss_fn, config, accepted", [
    ("ppo", {"beta": 0.1}, "clip_low_threshold, clip_high_threshold"),
    ("dro", {"clip_low_threshold": 0.9}, "beta"),
    ("cross_entropy", {"beta": 0.1}, "none"),
])
def test_unknown_loss_config_keys_are_refused_naming_the_key(engine, loss_fn, config, accepted):
    twin_runs(engine, "a")
    data = make_data(engine, "a", loss_fn)
    with pytest.raises(EngineError, match=rf"{loss_fn} does not take '{next(iter(config))}' \(it takes: {accepted}\)"):
        engine.forward_backward("a", data, loss_fn, loss_fn_config=config)
    assert all(p.grad is None for p in engine._runs["a"].params)


# ---------------------------------------------------------------------- forward-only, logprobs
@pytest.mark.parametrize("loss_fn", ["cross_entropy", "dro"])
def test_forward_only_gives_the_loss_and_logprobs_and_leaves_gradients_alone(engine, loss_fn):
    twin_runs(engine, "a")
    data = make_data(engine, "a", loss_fn)
    params = engine._runs["a"].params
    forward = engine.forward_backward("a", data, loss_fn, forward_only=True)
    assert all(p.grad is None for p in params)

    both = engine.forward_backward("a", data, loss_fn)
    assert forward.loss == pytest.approx(both.loss, rel=1e-6)
    assert forward.num_tokens == both.num_tokens
    assert_same_logprobs(forward.logprobs, both.logprobs, abs=1e-6)
    accumulated = grads(engine, "a").clone()
    engine.forward_backward("a", data, loss_fn, forward_only=True, all_logprobs=True)
    assert torch.equal(grads(engine, "a"), accumulated)


@pytest.mark.parametrize("path", ["hand_written", "autograd"])
@pytest.mark.parametrize("loss_fn", ["cross_entropy", "dro"])  # dro: zero-advantage positions would add a penalty
def test_all_logprobs_fills_every_position_and_changes_nothing_else(engine, loss_fn, path):
    twin_runs(engine, "sparse", "full")
    data = make_data(engine, "sparse", loss_fn)
    if path == "autograd":
        use_autograd_head(engine)
    sparse = engine.forward_backward("sparse", data, loss_fn)
    full = engine.forward_backward("full", data, loss_fn, all_logprobs=True)

    assert full.loss == pytest.approx(sparse.loss, rel=1e-6)
    assert full.num_tokens == sparse.num_tokens
    assert rel_diff(grads(engine, "full"), grads(engine, "sparse")) < 1e-6
    for datum, got, before in zip(data, full.logprobs, sparse.logprobs):
        assert None in before and None not in got
        assert [g for g, b in zip(got, before) if b is not None] == pytest.approx([b for b in before if b is not None], abs=1e-6)
        with torch.no_grad():
            want = model_logprobs(engine, "full", datum.model_input.tokens).gather(
                -1, torch.tensor(datum.loss_fn_inputs.target_tokens)[:, None])[:, 0]
        assert got == pytest.approx(want.tolist(), abs=1e-4)
