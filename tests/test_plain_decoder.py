"""The decoder's forward without transformers' and peft's modules (engine/plain_decoder.py) gives
what the modules give, for each model family it covers:
  * sampling (its decode steps): the same seeded tokens and, to rounding, the same logprobs, with
    runs of different LoRA targets and the base model in one batch, left padding, a shared system
    prefix, rows finishing early, and both KV caches (copied to every candidate, and each prompt's
    shared by its candidates);
  * training (whole sequences): the same loss, logprobs and LoRA gradients, padding and LoRA
    dropout included; and scoring and prompt logprobs.
CPU only, offline; tiny random models whose decoder weights are drawn large enough that greedy
continuations depend on the prompt."""

from __future__ import annotations

import json

import pytest
import torch
from test_sampler import random_prompts, tokens_of
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import eztinker.engine.output_projection as output_projection
import eztinker.engine.packed_linear as packed_linear
import eztinker.engine.plain_decoder as plain_decoder
import eztinker.engine.sampler as sampler_module
from eztinker.chat import datum_from_tokens
from eztinker.engine import Engine, SampleSpec, load_base_model
from eztinker.tiny import copy_tokenizer, make_tiny_llama, make_tiny_model, qwen2_config_dir
from eztinker.types import AdamParams, LoraConfig, SamplingParams


def _tiny_qwen3(out_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen2_config_dir())
    qwen = json.loads((qwen2_config_dir() / "config.json").read_text())
    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=qwen.get("eos_token_id"),
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    copy_tokenizer(qwen2_config_dir(), out_dir)
    return out_dir


_MAKERS = {"qwen2": make_tiny_model, "llama": make_tiny_llama, "qwen3": _tiny_qwen3}


@pytest.fixture(scope="module", params=sorted(_MAKERS))
def family_base(request, tmp_path_factory):
    made = _MAKERS[request.param](tmp_path_factory.mktemp(f"tiny-{request.param}"))
    model = AutoModelForCausalLM.from_pretrained(made, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.model.layers.parameters():
            param.normal_(0.0, 0.25 if param.dim() == 2 else 1.0, generator=generator)  # biases and norms too
    model.save_pretrained(made)
    base = load_base_model(str(made), cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")
    assert base.model.config.model_type == request.param
    return base


@pytest.fixture(scope="module")
def trained(family_base):
    """An engine with two runs trained away from the base model, on different LoRA targets. Its
    weights are packed for oneDNN for every input size, whatever this machine's timing would pick,
    so that the comparisons below cover the packed path (F.linear is what transformers runs)."""
    with pytest.MonkeyPatch.context() as patch:
        everywhere = lambda weight, blocked: (True,) * len(packed_linear.BANDS)  # noqa: E731
        patch.setattr(packed_linear, "measured_choice", everywhere)
        patch.setattr(output_projection, "_head_choice", everywhere)
        engine = Engine(family_base)
        engine.warm_up()  # packs here, under the patch, as the backend's engines pack on start
        for run_id, seed, lora in (
            ("run_a", 1, LoraConfig(rank=4, alpha=16)),
            ("run_b", 2, LoraConfig(rank=2, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        ):
            engine.create_run(run_id, lora, seed=seed)
            prompt, reply = random_prompts([6, 8], seed=100 + seed)
            for _ in range(4):
                engine.forward_backward(run_id, [datum_from_tokens(prompt, reply)])
                engine.optim_step(run_id, AdamParams(learning_rate=3e-2))
    layer = engine.forward.plain_decoder().layers[0]
    projections = (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)
    assert engine.forward.output_head().packed is not None and all(p.packed is not None for p in projections)
    return engine


@pytest.mark.parametrize("cache", ["copied", "shared"])
def test_sampling_without_transformers_modules_equals_them(trained, cache, monkeypatch):
    """Prefill and decode steps by PlainDecoder, against the same sampling through the modules."""
    assert plain_decoder.supports(trained.forward.decoder(), trained.base.model.config)
    prefix = random_prompts([10], seed=9)[0]
    prompts = [prefix + tail for tail in random_prompts([1, 6, 13], seed=10)]
    specs = [
        SampleSpec("run_a", prompts, 3, SamplingParams(temperature=1.0, seed=5, max_tokens=10)),
        SampleSpec(
            None, prompts[1:], 2, SamplingParams(temperature=0.8, seed=6, max_tokens=7, stop_token_ids=[17, 101])
        ),
        SampleSpec("run_b", prompts[:2], 2, SamplingParams(temperature=0, max_tokens=9)),
    ]
    one_token = SampleSpec("run_a", [random_prompts([1], seed=4)[0]], 1, SamplingParams(temperature=0, max_tokens=5))
    monkeypatch.setattr(sampler_module, "_COMPACT_FRACTION", 10**6)  # every finished row leaves at once
    monkeypatch.setattr(sampler_module, "_worth_sharing", lambda prompts, candidates: cache == "shared")
    steps, prefills = [], []
    for name, calls in (("decode", steps), ("prefill", prefills)):
        original = getattr(plain_decoder.PlainDecoder, name)
        monkeypatch.setattr(
            plain_decoder.PlainDecoder,
            name,
            lambda self, *args, calls=calls, original=original: calls.append(args[0].shape) or original(self, *args),
        )
    # The prompts' shared prefix, once per adapter, then their own tokens left-padded over it;
    # with a one-token prompt besides, no shared prefix: every prompt whole, left-padded.
    batches = [(specs, [(3, 10), (7, 13)]), (specs + [one_token], [(8, 23)])]
    for batch, prefill_shapes in batches:
        prefills.clear(), steps.clear()
        lean = trained.sample(batch)
        assert prefills == prefill_shapes and len(steps) >= 9
        with monkeypatch.context() as patch:
            patch.setattr(trained.forward, "plain_decoder", lambda: None)  # as for a model it does not compute
            steps.clear(), prefills.clear()
            modules = trained.sample(batch)
            assert not steps and not prefills
        assert [tokens_of(r) for r in lean] == [tokens_of(r) for r in modules]
        for got_spec, want_spec in zip(lean, modules):
            for got, want in zip(got_spec, want_spec):
                for g, w in zip(got, want):
                    assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
        assert len({len(c.tokens) for r in lean for cs in r for c in cs}) > 1  # some rows stopped early
    greedy_a, greedy_b = (
        tokens_of(lean[2])[0][0],
        trained.sample([SampleSpec("run_a", prompts[:1], 1, SamplingParams(temperature=0, max_tokens=9))])[0][0][
            0
        ].tokens,
    )
    assert greedy_a != greedy_b  # the two runs really differ


def test_unsupported_structures_keep_transformers_modules(trained):
    """A decoder the step does not compute (here: another activation) is left to transformers."""
    config = trained.base.model.config
    decoder = trained.forward.decoder()
    assert plain_decoder.supports(decoder, config)
    original = config.hidden_act
    try:
        config.hidden_act = "gelu"
        assert not plain_decoder.supports(decoder, config)
    finally:
        config.hidden_act = original


def _through_both(engine, monkeypatch, call):
    """call() by PlainDecoder, then through the modules (checking each took its path)."""
    forwards = []
    original = plain_decoder.PlainDecoder.causal
    monkeypatch.setattr(
        plain_decoder.PlainDecoder, "causal", lambda self, *args: forwards.append(1) or original(self, *args)
    )
    plain = call()
    assert forwards
    with monkeypatch.context() as patch:
        patch.setattr(engine.forward, "plain_decoder", lambda: None)
        forwards.clear()
        modules = call()
        assert not forwards
    return plain, modules


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_forward_without_modules_equals_them(trained, dropout, monkeypatch):
    """forward_backward: loss, every logprob and the run's LoRA gradients equal peft's forward,
    with right padding (three lengths), other runs loaded, and LoRA dropout (the same seeded masks)."""
    engine = trained
    engine.create_run("run", LoraConfig(rank=4, alpha=16, dropout=dropout), seed=1)
    try:
        _train_both_ways(engine, monkeypatch)
    finally:
        engine.delete_run("run")


def _train_both_ways(engine, monkeypatch):
    prompt, reply = random_prompts([6, 8], seed=3)
    engine.forward_backward("run", [datum_from_tokens(prompt, reply)])
    engine.optim_step("run", AdamParams(learning_rate=3e-2))  # B != 0, so every LoRA factor has a gradient
    data = [
        datum_from_tokens(p, r) for p, r in zip(random_prompts([3, 9, 5], seed=4), random_prompts([4, 2, 11], seed=5))
    ]
    params = engine._runs["run"].params

    def step():
        for param in params:
            param.grad = None
        torch.manual_seed(7)
        result = engine.forward_backward("run", data, "cross_entropy")
        return result, [param.grad.clone() for param in params]

    (plain, plain_grads), (modules, module_grads) = _through_both(engine, monkeypatch, step)
    assert plain.loss == pytest.approx(modules.loss, rel=1e-5)
    for got, want in zip(plain.logprobs, modules.logprobs):
        assert got == pytest.approx(want, abs=1e-4)
    assert len(plain_grads) == len(params) > 0
    for got, want in zip(plain_grads, module_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert any(bool(g.abs().sum() > 0) for g in plain_grads)


def test_scores_and_prompt_logprobs_without_modules_equal_them(trained, monkeypatch):
    prompt, responses = random_prompts([5], seed=11)[0], random_prompts([3, 7, 1], seed=12)
    for adapter in ("run_a", "run_b", None):
        plain, modules = _through_both(
            trained, monkeypatch, lambda adapter=adapter: trained.score(adapter, prompt, responses)
        )
        assert [s.sum_logprob for s in plain] == pytest.approx([s.sum_logprob for s in modules], abs=1e-4)
        plain, modules = _through_both(
            trained,
            monkeypatch,
            lambda adapter=adapter: trained.prompt_logprobs(adapter, [prompt, responses[1]], topk=2),
        )
        for got, want in zip(plain, modules):
            assert got.logprobs[1:] == pytest.approx(want.logprobs[1:], abs=1e-4)
            assert [[t for t, _ in k] for k in got.topk[1:]] == [[t for t, _ in k] for k in want.topk[1:]]


def test_a_new_runs_dropout_acts_only_in_training(trained):
    """A run with LoRA dropout, created after others: its scores are deterministic (dropout off),
    and equal before and after a training call switched it on and off again."""
    trained.create_run("dropping", LoraConfig(rank=4, alpha=16, dropout=0.5), seed=3)
    try:
        prompt, reply = random_prompts([5, 6], seed=21)
        trained.forward_backward("dropping", [datum_from_tokens(prompt, reply)])
        trained.optim_step("dropping", AdamParams(learning_rate=3e-2))  # B != 0: the dropout would show
        first, again = (trained.score("dropping", prompt, [reply])[0].sum_logprob for _ in range(2))
        assert first == again
        trained.create_run("dropping_too", LoraConfig(rank=4, alpha=16, dropout=0.5), seed=4)
        trained._runs["dropping_too"].params[1].data.normal_()  # a nonzero B: its dropout would change scores
        scores = {trained.score("dropping_too", prompt, [reply])[0].sum_logprob for _ in range(3)}
        assert len(scores) == 1
        trained.delete_run("dropping_too")
    finally:
        trained.delete_run("dropping")


def test_the_plain_decoder_follows_the_projections_peft_wraps_and_unwraps(tiny_model_dir, tmp_path, monkeypatch):
    """An engine that computed with no run yet (projections not wrapped by peft), then creates one:
    its scores through the plain decoder still carry the run's LoRA, as through the modules; with
    the last run deleted (peft unwrapped again) the bare model's scores are as before."""
    engine = Engine(load_base_model(str(tiny_model_dir), cache_dir=tmp_path, device="cpu"))
    prompt, responses = random_prompts([5], seed=31)[0], random_prompts([4, 6], seed=32)
    bare = [s.sum_logprob for s in engine.score(None, prompt, responses)]
    engine.create_run("late", LoraConfig(rank=4, alpha=16), seed=5)
    for param in engine._runs["late"].params:
        param.data.normal_(0.0, 0.5)  # B != 0, large: the adapter changes every score
    plain, modules = _through_both(engine, monkeypatch, lambda: engine.score("late", prompt, responses))
    assert [s.sum_logprob for s in plain] == pytest.approx([s.sum_logprob for s in modules], abs=1e-4)
    assert [s.sum_logprob for s in plain] != pytest.approx(bare, abs=1e-2)
    engine.delete_run("late")
    assert [s.sum_logprob for s in engine.score(None, prompt, responses)] == pytest.approx(bare, abs=1e-5)


def test_packed_weights_compute_f_linear_and_its_input_gradient():
    """A base weight packed for oneDNN gives F.linear's output and input gradient (2-D and 3-D
    inputs, with a bias, one row to many, whichever sizes it serves); weights it does not apply
    to are not packed, and a trainable weight is multiplied as it is."""
    from eztinker.engine.packed_linear import linear, pack

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
    for serves in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        packed = pack(weight, choose=lambda weight, blocked, serves=serves: serves)
        assert packed.faster == serves
        for shape in ((1, 24), (5, 24), (2, 3, 24), (17, 24), (3, 16, 24)):
            x = torch.randn(*shape, generator=generator, requires_grad=True)
            got = linear(x, weight, bias, packed)
            (got * torch.arange(40.0)).sum().backward()
            got_grad, x.grad = x.grad, None
            want = torch.nn.functional.linear(x, weight, bias)
            (want * torch.arange(40.0)).sum().backward()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_grad, x.grad, rtol=1e-5, atol=1e-4)
    assert pack(weight.to(torch.bfloat16)) is None and pack(bias) is None
    trainable = weight.clone().requires_grad_(True)
    linear(torch.randn(2, 24), trainable, None, packed).sum().backward()
    assert trainable.grad is not None


def test_a_weight_is_packed_for_the_sizes_where_onednn_measured_faster():
    """`pack` keeps the blocked copy only for the input sizes where it beat F.linear (an output
    head's, where it beat the head's column blocks): the real timing gives a decision for every
    band of sizes, made once per shape; a weight that lost in every band is not packed at all (no
    second copy of its memory)."""
    from eztinker.engine import packed_linear

    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    packed = packed_linear.pack(weight)
    decision = packed_linear._measured[((48, 32), torch.float32)]
    assert len(decision) == len(packed_linear.BANDS) and all(isinstance(faster, bool) for faster in decision)
    assert packed is None if not any(decision) else packed.faster == decision
    assert packed_linear.measured_choice(weight.clone(), None) == decision  # the same shape is not timed again
    assert packed_linear.pack(weight, choose=lambda weight, blocked: (False, False, False)) is None
    head = torch.randn(4096, 32, generator=torch.Generator().manual_seed(1))  # timed against its column blocks
    packed_head = output_projection.pack_head(head)
    decision = output_projection._measured[((4096, 32), torch.float32)]
    assert len(decision) == len(packed_linear.BANDS) and (
        packed_head is None if not any(decision) else packed_head.faster == decision
    )
    served = packed_linear.PackedWeight(torch.empty(0), faster=(False, True, False))
    assert [served.serves(rows) for rows in (1, 2, 16, 17, 4096)] == [False, True, True, False, False]
