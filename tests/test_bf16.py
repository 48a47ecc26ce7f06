"""The GPU's code path, run on the CPU: the engine in bf16 with the CPU-only kernels off
(device_paths.portable_kernels), a tiny random Qwen2 whose weights are scaled up so that its
attention and next-token distributions are peaked (bf16 rounding then shows). Also activation
checkpointing and the activations autograd keeps. No GPU needed, no mocks."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE
from transformers import AutoModelForCausalLM

from eztinker.chat import datum_from_tokens
from eztinker.engine import Engine, SampleSpec, device_paths, load_base_model, prompt_attention
from eztinker.engine.engine import head_matches
from eztinker.tiny import copy_tokenizer
from eztinker.types import AdamParams, LoraConfig, SamplingParams

LORA = LoraConfig(rank=4, alpha=16)


@pytest.fixture(scope="module")
def peaked_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Qwen2 with every matrix x10: logprobs spread over ~1.6 nats, as a real model's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(10)
    out = tmp_path_factory.mktemp("peaked-qwen2")
    model.save_pretrained(out)
    copy_tokenizer(tiny_model_dir, out)
    (out / "generation_config.json").write_bytes((tiny_model_dir / "generation_config.json").read_bytes())
    return out


@pytest.fixture(scope="module")
def bf16_engine(peaked_model_dir, tmp_path_factory):
    with device_paths.portable_kernels():
        base = load_base_model(
            str(peaked_model_dir), cache_dir=tmp_path_factory.mktemp("cache"), device=TEST_DEVICE, dtype=torch.bfloat16
        )
        engine = Engine(base)
        engine.warm_up()  # as the backend does: the weights' packing decided before any call
        yield engine
        engine.close()


def _data(count: int, length: int, seed: int):
    rng = torch.Generator().manual_seed(seed)
    return [
        datum_from_tokens(
            torch.randint(0, 2000, (length // 2,), generator=rng).tolist(),
            torch.randint(0, 2000, (length - length // 2 + 1,), generator=rng).tolist(),
        )
        for _ in range(count)
    ]


def test_bf16_engine_trains_and_samples_on_the_gpu_code_path(bf16_engine):
    engine = bf16_engine
    assert next(engine.base.model.parameters()).dtype == torch.bfloat16
    assert engine.forward.output_head() is not None  # the head's fast path survives its bf16 probe
    assert not any(packed for _, packed in engine.forward._packs.values())  # oneDNN packing is the CPU's alone
    engine.create_run("bf16", LORA, seed=1)
    data = _data(4, 24, seed=0)
    losses = []
    for _ in range(4):
        losses.append(engine.forward_backward("bf16", data).loss)
        engine.optim_step("bf16", AdamParams(learning_rate=2e-2))
    assert losses[-1] < losses[0] * 0.9
    run = engine._runs["bf16"]
    assert {p.dtype for p in run.params} == {torch.float32}  # LoRA weights stay float32
    states = [s for s in run.optimizer.state.values()]
    assert states and {t.dtype for s in states for k, t in s.items() if k != "step"} == {torch.float32}
    [[candidates]] = engine.sample(
        [SampleSpec("bf16", [data[0].model_input.tokens], 3, SamplingParams(max_tokens=6, seed=2))]
    )
    assert len(candidates) == 3 and all(len(c.tokens) == 6 and len(c.logprobs) == 6 for c in candidates)
    engine.delete_run("bf16")


def test_sampler_and_trainer_logprobs_agree_in_bf16(bf16_engine, monkeypatch):
    """The cookbook's kl_sample_train (v1: mean of sampler - trainer logprobs; v2: half their mean
    square) under 1e-3, with each prompt's candidates sharing its KV cache (the two-part attention
    off the CPU's fused kernel: matmuls and a log-sum-exp). bf16 scores there gave v1 2.7e-3 to 7.9e-3."""
    engine = bf16_engine
    engine.create_run("agree", LORA, seed=4)
    engine.forward_backward("agree", _data(2, 20, seed=5))
    engine.optim_step("agree", AdamParams(learning_rate=5e-2))  # a nonzero LoRA update in both paths
    shared_steps = []
    attend = prompt_attention.SharedPromptCache.attend
    monkeypatch.setattr(
        prompt_attention.SharedPromptCache, "attend", lambda self, *args: shared_steps.append(1) or attend(self, *args)
    )
    rng = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 1000, (200,), generator=rng).tolist()
    prompts = [prefix + torch.randint(0, 1000, (n,), generator=rng).tolist() for n in (40, 70)]
    [sampled] = engine.sample([SampleSpec("agree", prompts, 8, SamplingParams(max_tokens=12, seed=3))])
    assert shared_steps  # the shared-prompt attention served the decode steps
    diffs = []
    for prompt, candidates in zip(prompts, sampled):
        data = [datum_from_tokens(prompt, c.tokens) for c in candidates]
        trained = engine.forward_backward("agree", data, forward_only=True).logprobs
        for c, row in zip(candidates, trained):
            diffs += [s - t for s, t in zip(c.logprobs, row[len(prompt) - 1 :])]
    diffs = torch.tensor(diffs, dtype=torch.float64)
    assert len(diffs) == 2 * 8 * 12 or len(diffs) > 100
    assert abs(float(diffs.mean())) < 1e-3
    assert 0.5 * float((diffs**2).mean()) < 1e-3
    engine.delete_run("agree")


def test_training_keeps_no_float32_copies_of_bf16_activations(bf16_engine):
    """Every tensor the training forward keeps for its backward pass, at [tokens, hidden] or
    larger, is bf16: the LoRA inputs and the norms' inputs are not kept in float32 (they were,
    twice the bytes, five a layer)."""
    engine = bf16_engine
    engine.create_run("saved", LORA, seed=1)
    engine.adapters.activate("saved")
    input_ids, mask = engine.forward.right_pad([d.model_input.tokens for d in _data(2, 32, seed=1)])
    kept = []
    checkpointing, engine.activation_checkpointing = engine.activation_checkpointing, False
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            hidden = engine.forward.hidden_states("saved", input_ids, mask)
    finally:
        engine.activation_checkpointing = checkpointing
    large = [t for t in kept if t.numel() >= input_ids.numel() * engine.base.model.config.hidden_size]
    assert hidden.requires_grad and large
    assert {t.dtype for t in large} == {torch.bfloat16}
    engine.delete_run("saved")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(engine, tiny_base, dropout):
    """Checkpointed training (each layer recomputed in the backward, its dropout masks replayed)
    gives the loss and adapter gradients of the plain forward, and keeps a fraction of its tensors."""
    lora = LoraConfig(rank=4, alpha=16, dropout=dropout)
    data = _data(3, 30, seed=2)
    grads, kept_bytes = {}, {}
    for checkpoint in (False, True):
        run_id = f"ckpt-{checkpoint}"
        engine.create_run(run_id, lora, seed=7)
        kept = []
        with torch.random.fork_rng(devices=[]):  # the same dropout masks in both runs
            torch.manual_seed(11)
            engine.forward_backward(run_id, data)
            engine.optim_step(run_id, AdamParams(learning_rate=1e-2))  # lora_B nonzero: every gradient flows
            engine.activation_checkpointing = checkpoint
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t, kept=kept: kept.append(t.numel() * t.element_size()) or t, lambda t: t
            ):
                loss = engine.forward_backward(run_id, data).loss
        kept_bytes[checkpoint] = sum(kept)
        grads[checkpoint] = (loss, torch.cat([p.grad.flatten() for p in engine._runs[run_id].params]))
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=1e-5, atol=1e-7)
    assert grads[False][1].abs().sum() > 0
    assert kept_bytes[True] < 0.5 * kept_bytes[False]


def test_head_probe_tolerance_fits_the_dtype():
    """bf16 logits two summation orders round apart pass the bf16 probe (a 1e-4 probe would switch
    the head's fast path off there); the same gap fails in float32, and a wrong head fails in both."""
    want = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0)) * 8
    rounded_apart = want + want.abs() * 2**-8 * torch.sign(torch.randn(1, 4096))  # one bf16 ulp of drift
    assert not torch.allclose(rounded_apart, want, rtol=1e-4, atol=1e-4)
    assert head_matches(rounded_apart, want, torch.bfloat16)
    assert not head_matches(rounded_apart, want, torch.float32)
    wrong = want * 1.1
    assert not head_matches(wrong, want, torch.bfloat16) and not head_matches(wrong, want, torch.float32)


def test_bf16_checkpointing_gives_the_plain_gradients(bf16_engine):
    """In bf16 (the GPU's default: checkpointing on) the recomputed layers, the low-precision
    RMSNorm's own backward included, give the gradients of the plain forward."""
    engine = bf16_engine
    engine.create_run("ckpt", LORA, seed=2)
    engine.forward_backward("ckpt", _data(2, 20, seed=3))
    engine.optim_step("ckpt", AdamParams(learning_rate=5e-2))
    grads = {}
    checkpointing = engine.activation_checkpointing
    try:
        for checkpoint in (False, True):
            engine.activation_checkpointing = checkpoint
            engine.forward_backward("ckpt", _data(2, 20, seed=4))
            grads[checkpoint] = torch.cat([p.grad.flatten() for p in engine._runs["ckpt"].params])
            engine._runs["ckpt"].optimizer.zero_grad(set_to_none=True)
    finally:
        engine.activation_checkpointing = checkpointing
    assert grads[False].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-3, atol=1e-6)
    engine.delete_run("ckpt")
