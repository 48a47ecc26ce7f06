"""The optimizer step, field by field: AdamParams' every field changes the engine's step exactly as
AdamW's formula says, computed here by hand in float64 on a tiny case (no torch optimizer in the
reference). And the one parameter model's defaults per door."""

from __future__ import annotations

import math

import pytest
import torch

from eztinker.types import TINKER_ADAM_DEFAULTS, AdamParams, LoraConfig

LORA = LoraConfig(rank=2, alpha=4, target_modules=["q_proj"], train_unembed=True)
BASE = dict(learning_rate=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)
VARIANTS = {  # each field moved alone, far enough that its effect is plain
    "learning_rate": 0.02,
    "beta1": 0.5,
    "beta2": 0.6,
    "eps": 0.3,
    "weight_decay": 0.5,
    "grad_clip_norm": 0.5,
}


def gradients(params, step: int) -> list[torch.Tensor]:
    """Fixed, different gradients per step, of global norm about 2-3 (so clipping at 0.5 acts)."""
    generator = torch.Generator().manual_seed(100 + step)
    return [
        torch.randn(p.shape, generator=generator) * (2.5 / math.sqrt(sum(q.numel() for q in params))) for p in params
    ]


def adamw_by_hand(
    initial: list[torch.Tensor], steps: list[tuple[list[torch.Tensor], AdamParams]]
) -> list[torch.Tensor]:
    """AdamW, decoupled weight decay, after clipping the global gradient norm (torch's rule:
    scale by clip / (norm + 1e-6) when that is below 1), in float64."""
    params = [p.double().clone() for p in initial]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, (grads, adam) in enumerate(steps, start=1):
        grads = [g.double() for g in grads]
        if adam.grad_clip_norm:
            norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
            scale = min(1.0, adam.grad_clip_norm / (norm + 1e-6))
            grads = [g * scale for g in grads]
        for i, g in enumerate(grads):
            m[i] = adam.beta1 * m[i] + (1 - adam.beta1) * g
            v[i] = adam.beta2 * v[i] + (1 - adam.beta2) * g * g
            m_hat = m[i] / (1 - adam.beta1**t)
            v_hat = v[i] / (1 - adam.beta2**t)
            params[i] = params[i] * (1 - adam.learning_rate * adam.weight_decay) - adam.learning_rate * m_hat / (
                v_hat.sqrt() + adam.eps
            )
    return params


def engine_steps(engine, run_id: str, adam: AdamParams, steps: int = 2) -> tuple[list, list]:
    """(initial params, params after `steps` steps with the fixed gradients), each step by the engine."""
    engine.create_run(run_id, LORA, seed=3)
    params = engine._runs[run_id].params
    initial = [p.detach().clone() for p in params]
    for step in range(steps):
        for p, g in zip(params, gradients(params, step)):
            p.grad = g.clone()
        engine.optim_step(run_id, adam)
    return initial, [p.detach().clone() for p in params]


def test_every_adam_field_changes_the_step_as_the_formula_says(engine):
    base = AdamParams(**BASE)
    initial, stepped = engine_steps(engine, "base", base)
    want_base = adamw_by_hand(initial, [(gradients(initial, s), base) for s in range(2)])
    for got, want in zip(stepped, want_base, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    for field, value in VARIANTS.items():
        adam = AdamParams(**{**BASE, field: value})
        initial, stepped = engine_steps(engine, field, adam)
        want = adamw_by_hand(initial, [(gradients(initial, s), adam) for s in range(2)])
        for got, expected in zip(stepped, want, strict=True):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7, msg=field)
        moved = max(float((a - b).abs().max()) for a, b in zip(want, want_base))
        assert moved > 1e-4, f"{field}={value} should change the step"  # the field is not ignored
        engine.delete_run(field)


def test_clipping_is_off_at_zero_or_none(engine):
    results = {}
    for i, clip in enumerate((0.0, None, 1e9)):
        run_id = f"clip{i}"
        _, results[clip] = engine_steps(engine, run_id, AdamParams(**{**BASE, "grad_clip_norm": clip}), steps=1)
    for a, b, c in zip(results[0.0], results[None], results[1e9]):
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-7)


def test_one_model_two_doors_defaults():
    rest, tinker = AdamParams(), AdamParams.tinker({})
    assert (rest.beta2, rest.eps, rest.clip_norm) == (0.999, 1e-8, 1.0)
    assert (tinker.beta2, tinker.eps, tinker.clip_norm) == (0.95, 1e-12, None)
    assert tinker.learning_rate == rest.learning_rate == 1e-4 and tinker.beta1 == rest.beta1 == 0.9
    # Each default is the SDK's own (tinker.types.AdamParams), where the SDK is installed.
    sdk = pytest.importorskip("tinker").types.AdamParams()
    assert AdamParams.tinker(sdk.model_dump()) == tinker
    assert all(getattr(sdk, key) == value for key, value in TINKER_ADAM_DEFAULTS.items())
    # What a Tinker request gives overrides the defaults; what it misspells is refused.
    assert AdamParams.tinker({"beta2": 0.5, "grad_clip_norm": 2.0}).clip_norm == 2.0
    with pytest.raises(ValueError, match="momentum"):
        AdamParams.tinker({"momentum": 0.9})
