"""A LoRA on the output head (`train_unembed`, Tinker's default) on the tiny Qwen2, whose head is tied
to its input embeddings: the engine's own logits (training projection, scoring, the sampler's fast
head) equal peft's model with the adapter, its gradient equals autograd's through peft, the input
embeddings never change, and checkpoints stay plain peft adapters (loadable, mergeable, servable)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from eztinker.engine import SampleSpec
from eztinker.engine.engine import ADAPTER_WEIGHTS
from eztinker.export import export_checkpoint
from eztinker.types import AdamParams, Datum, LoraConfig, LossFnInputs, ModelInput, SamplingParams

UNEMBED = LoraConfig(rank=4, alpha=16, train_unembed=True)
TOKENS = [100, 200, 300, 400, 500, 600, 700, 42, 7]


def datum(tokens=TOKENS) -> Datum:
    return Datum(
        model_input=ModelInput(tokens=tokens[:-1]),
        loss_fn_inputs=LossFnInputs(target_tokens=tokens[1:], weights=[1.0] * (len(tokens) - 1)),
    )


def head_layer(engine):
    head = engine.base.model.get_output_embeddings()
    assert isinstance(head, peft.tuners.lora.LoraLayer)
    return head


def perturb(engine, run_id: str, seed: int = 0) -> None:
    """Every LoRA factor of the run nonzero (B starts at zero), the head's included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in engine._runs[run_id].params:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def peft_logits(engine, run_id: str | None, tokens) -> torch.Tensor:
    """The logits of peft's own model (the whole model, its lm_head LoRA layer included)."""
    input_ids = torch.tensor([tokens])
    with torch.no_grad():
        if run_id is None:
            with engine.adapters.peft.disable_adapter():
                return engine.adapters.peft(input_ids=input_ids).logits[0].float()
        engine.adapters.peft.set_adapter(run_id)
        return engine.adapters.peft(input_ids=input_ids).logits[0].float()


@pytest.fixture()
def unembed(engine):
    embeddings = engine.base.model.get_input_embeddings().weight.detach().clone()
    engine.create_run("head", UNEMBED, seed=1)
    perturb(engine, "head")
    yield engine
    # The input embeddings the head shares its weight with are as loaded, whatever was trained.
    assert torch.equal(engine.base.model.get_input_embeddings().weight, embeddings)
    engine.close()  # snapshots too: the next test's engine gets the base model as loaded


def test_the_head_gets_a_lora_only_when_asked(engine):
    assert engine.base.model.config.tie_word_embeddings
    engine.create_run("plain", LoraConfig(rank=4, alpha=16), seed=1)
    assert not isinstance(engine.base.model.get_output_embeddings(), peft.tuners.lora.LoraLayer)
    engine.create_run("head", UNEMBED, seed=1)
    layer = head_layer(engine)
    assert set(layer.lora_A) == {"head"}
    # The head's factors are the run's trainable parameters (last, as in named_parameters), and the
    # other layers got the same seeded init as a run without the head's LoRA.
    params = engine._runs["head"].params
    assert params[-2] is layer.lora_A["head"].weight and params[-1] is layer.lora_B["head"].weight
    for mine, theirs in zip(params[:-2], engine._runs["plain"].params, strict=True):
        assert torch.equal(mine, theirs)
    # The head alone: no other layer adapted.
    engine.create_run("only", LoraConfig(rank=2, alpha=4, train_unembed=True, target_modules=[]), seed=1)
    assert len(engine._runs["only"].params) == 2


def test_logprobs_and_gradient_equal_pefts_model(unembed, tiny_base):
    engine, example = unembed, datum()
    want_logprobs = torch.log_softmax(peft_logits(engine, "head", TOKENS[:-1]), -1)[
        torch.arange(len(TOKENS) - 1), torch.tensor(TOKENS[1:])
    ]
    result = engine.forward_backward("head", [example])
    assert torch.allclose(torch.tensor(result.logprobs[0]), want_logprobs, atol=1e-5)
    mine = [p.grad.clone() for p in engine._runs["head"].params]
    # The same loss by autograd through peft's model, the head's LoRA layer included.
    engine.optim_step("head", AdamParams(learning_rate=1e-9))  # clears the gradients
    for p in engine._runs["head"].params:
        p.grad = None
    engine.adapters.peft.set_adapter("head")
    logits = engine.adapters.peft(input_ids=torch.tensor([TOKENS[:-1]])).logits[0].float()
    loss = -torch.log_softmax(logits, -1)[torch.arange(len(TOKENS) - 1), torch.tensor(TOKENS[1:])].sum()
    loss.backward()
    assert loss.item() == pytest.approx(result.loss, rel=1e-5)
    theirs = [p.grad for p in engine._runs["head"].params]
    assert mine[-1].abs().sum() > 0 and mine[-2].abs().sum() > 0  # the head's A and B are trained
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p in engine._runs["head"].params:
        p.grad = None


def test_the_head_lora_changes_the_logits_and_the_base_does_not_see_it(unembed):
    engine = unembed
    prompt = [[5, 6, 7, 8]]
    with_head = engine.prompt_logprobs("head", prompt)[0].logprobs[1:]
    with torch.no_grad():
        head_layer(engine).lora_B["head"].weight.zero_()
    without = engine.prompt_logprobs("head", prompt)[0].logprobs[1:]
    assert max(abs(a - b) for a, b in zip(with_head, without)) > 1e-3
    base = torch.log_softmax(peft_logits(engine, None, prompt[0]), -1)[torch.arange(3), torch.tensor(prompt[0][1:])]
    assert torch.allclose(torch.tensor(engine.prompt_logprobs(None, prompt)[0].logprobs[1:]), base, atol=1e-5)


def test_sampled_logprobs_are_the_heads(unembed):
    """The sampler's fast head adds each row's head LoRA: sampled tokens' logprobs equal the scoring
    path's, in a batch mixing the run, a run without a head LoRA and the base model."""
    engine = unembed
    engine.create_run("plain", LoraConfig(rank=4, alpha=16), seed=2)
    perturb(engine, "plain", seed=3)
    prompt = [11, 12, 13, 14]
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=5)
    specs = [SampleSpec(adapter=a, prompts=[prompt], num_samples=2, params=params) for a in ("head", "plain", None)]
    assert engine.forward.output_head() is not None  # the fast path is the one under test
    results = engine.sample(specs)
    for spec, result in zip(specs, results):
        for candidate in result[0]:
            scored = engine.prompt_logprobs(spec.adapter, [prompt + candidate.tokens])[0].logprobs[len(prompt) :]
            assert candidate.logprobs == pytest.approx(scored, abs=1e-4)


def test_checkpoint_is_a_plain_peft_adapter_and_merges(unembed, tiny_model_dir, tmp_path):
    engine = unembed
    directory = tmp_path / "checkpoints" / "head" / "c1"
    engine.save("head", directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"]
    from safetensors.torch import load_file

    keys = load_file(directory / ADAPTER_WEIGHTS).keys()
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)  # no copy of the base head or embeddings
    assert any("lm_head.lora_B" in k for k in keys)
    (directory / "training_state.json").write_text(
        json.dumps({**json.loads((directory / "training_state.json").read_text()), "base_model": str(tiny_model_dir)})
    )

    want = peft_logits(engine, "head", TOKENS)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    embeddings = base.get_input_embeddings().weight.detach().clone()
    loaded = peft.PeftModel.from_pretrained(base, directory).eval()
    with torch.no_grad():
        got = loaded(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # A snapshot of the checkpoint (what sampling from it, Tinker's and OpenAI's, uses) scores the same.
    snapshot = engine.snapshot(directory)
    assert engine.prompt_logprobs(snapshot, [TOKENS])[0].logprobs == pytest.approx(
        engine.prompt_logprobs("head", [TOKENS])[0].logprobs[0:], abs=1e-5
    )

    # Merged export: a plain model with the head's update, its input embeddings untouched (untied).
    out = export_checkpoint(tmp_path, "head/c1", tmp_path / "merged", merge=True).out
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=torch.tensor([TOKENS])).logits[0], want, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged.get_input_embeddings().weight, embeddings)
    assert not merged.config.tie_word_embeddings
