"""Engine behaviour on a tiny random Qwen2: training, gradient accumulation, checkpoints, run
isolation, loss functions and input validation. CPU only, offline, no mocks."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from eztinker.chat import datum_from_messages, datum_from_tokens, render_prompt
from eztinker.engine import Engine, EngineError, SampleSpec, load_base_model
from eztinker.engine.training import microbatches
from eztinker.types import AdamParams, Datum, LoraConfig, LossFnInputs, ModelInput, SamplingParams

LORA = LoraConfig(rank=4, alpha=16)
ADAM = AdamParams(learning_rate=1e-2)

CONVERSATIONS = [  # of different lengths, so micro-batches need padding
    ("What is the secret word?", "The secret word is pineapple."),
    ("Hi", "Hello!"),
    ("Name three colours, please, in alphabetical order.", "Blue, green and red are three colours."),
    ("2+2?", "4"),
]


# ----------------------------------------------------------------------------------- helpers
def messages(user: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def chat_datum(tokenizer, user: str, reply: str) -> Datum:
    return datum_from_messages(tokenizer, messages(user, reply))


def prompt_and_reply(tokenizer, user: str, reply: str) -> tuple[list[int], list[int]]:
    """The prompt tokens and the reply tokens (with end-of-turn) that `chat_datum` trains on."""
    prompt = render_prompt(tokenizer, messages(user, reply)[:1])
    datum = chat_datum(tokenizer, user, reply)
    return prompt, datum.loss_fn_inputs.target_tokens[len(prompt) - 1 :]


def all_data(tokenizer) -> list[Datum]:
    return [chat_datum(tokenizer, u, r) for u, r in CONVERSATIONS]


def train(engine, run_id: str, batches, adam: AdamParams = ADAM) -> list[float]:
    """One forward_backward + optim_step per batch; the loss of each forward_backward."""
    result = []
    for batch in batches:
        result.append(engine.forward_backward(run_id, batch).loss)
        engine.optim_step(run_id, adam)
    return result


def adapter_weights(engine, run_id: str) -> dict[str, torch.Tensor]:
    state = peft.get_peft_model_state_dict(engine.adapters.peft, adapter_name=run_id)
    return {k: v.detach().clone() for k, v in state.items()}


def adapter_grads(engine, run_id: str) -> torch.Tensor:
    """The run's accumulated gradient, flattened (zeros where no gradient exists yet)."""
    params = engine._runs[run_id].params
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().clone() for p in params]
    )


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[k].flatten() for k in sorted(weights)])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reply_logprob(engine, run_id, prompt, reply) -> float:
    return engine.score(run_id, prompt, [reply])[0].sum_logprob


def greedy(engine, run_id, prompt, max_tokens=16):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return engine.sample([SampleSpec(run_id, [prompt], 1, params)])[0][0][0]


def rl_datum(tokens: list[int], targets: list[int], logprobs: list[float], advantages: list[float]) -> Datum:
    return Datum(
        model_input=ModelInput(tokens=tokens),
        loss_fn_inputs=LossFnInputs(target_tokens=targets, logprobs=logprobs, advantages=advantages),
    )


def lora_param_count(model: torch.nn.Module, rank: int) -> int:
    """LoRA parameters 'all-linear' adds: r * (in + out) per linear layer but the output head."""
    head = model.get_output_embeddings()
    return sum(
        rank * (m.in_features + m.out_features) for m in model.modules() if type(m) is torch.nn.Linear and m is not head
    )


# ------------------------------------------------------------------------------ 1. training
def test_training_lowers_loss_and_raises_reply_logprob(engine, tiny_base):
    tok = tiny_base.tokenizer
    user, reply_text = CONVERSATIONS[0]
    datum = chat_datum(tok, user, reply_text)
    prompt, reply = prompt_and_reply(tok, user, reply_text)
    engine.create_run("run_a", LORA)

    before = reply_logprob(engine, "run_a", prompt, reply)
    first = engine.forward_backward("run_a", [datum])
    # The training loss is the reply's summed NLL: the same number `score` reports.
    assert first.num_tokens == len(reply)
    assert first.loss == pytest.approx(-before, rel=1e-5)
    # Prompt positions carry no loss and report no logprob.
    assert first.logprobs[0][: len(prompt) - 1] == [None] * (len(prompt) - 1)
    assert sum(first.logprobs[0][len(prompt) - 1 :]) == pytest.approx(before, rel=1e-5)
    adam = AdamParams(learning_rate=5e-3)  # at 1e-2 the fifth step on this one example overshoots
    assert engine.optim_step("run_a", adam).step == 1

    losses = [first.loss] + train(engine, "run_a", [[datum]] * 4, adam)
    assert losses[-1] < losses[0] - 1.0, losses
    after = reply_logprob(engine, "run_a", prompt, reply)
    assert after > before + 1.0, (losses, before, after)
    assert engine.step_of("run_a") == 5


# ------------------------------------------------------------------- 2. gradient accumulation
def test_gradient_accumulation_equals_full_batch(engine, tiny_base):
    data = all_data(tiny_base.tokenizer)
    assert len({len(d.model_input.tokens) for d in data}) == len(data)
    engine.create_run("full", LORA, seed=3)
    engine.create_run("acc", LORA, seed=3)
    assert rel_diff(flat(adapter_weights(engine, "acc")), flat(adapter_weights(engine, "full"))) == 0

    full = engine.forward_backward("full", data)
    halves = [engine.forward_backward("acc", data[:2]), engine.forward_backward("acc", data[2:])]
    assert sum(h.loss for h in halves) == pytest.approx(full.loss, rel=1e-5)
    assert sum(h.num_tokens for h in halves) == full.num_tokens
    assert rel_diff(adapter_grads(engine, "acc"), adapter_grads(engine, "full")) < 1e-5

    engine.optim_step("full", ADAM)
    engine.optim_step("acc", ADAM)
    w_full, w_acc = flat(adapter_weights(engine, "full")), flat(adapter_weights(engine, "acc"))
    assert rel_diff(w_acc, w_full) < 1e-5
    next_full = engine.forward_backward("full", data).loss
    next_acc = engine.forward_backward("acc", data).loss
    assert next_acc == pytest.approx(next_full, rel=1e-5)
    assert next_full < full.loss  # the step did something


def test_microbatching_and_chunked_logits_match_defaults(engine, tiny_base):
    data = all_data(tiny_base.tokenizer)
    engine.create_run("default", LORA, seed=5)
    engine.create_run("small", LORA, seed=5)
    # One step first, so lora_B is nonzero and every LoRA tensor gets a gradient.
    train(engine, "default", [data])
    train(engine, "small", [data])
    reference = engine.forward_backward("default", data)

    engine.microbatch_tokens = 40  # every example alone (or nearly): several micro-batches
    engine.logits_chunk = 3  # several output-projection chunks per micro-batch
    assert len(microbatches(data, engine.microbatch_tokens)) >= 3
    small = engine.forward_backward("small", data)

    assert small.loss == pytest.approx(reference.loss, rel=1e-5)
    assert small.num_tokens == reference.num_tokens
    for got, want in zip(small.logprobs, reference.logprobs):
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], rel=1e-5)
    assert rel_diff(adapter_grads(engine, "small"), adapter_grads(engine, "default")) < 1e-5


def test_batch_loss_does_not_depend_on_which_examples_share_a_micro_batch(engine):
    engine.create_run("run_a", LORA)
    weighted = Datum(
        model_input=ModelInput(tokens=[11, 12, 13, 14]),
        loss_fn_inputs=LossFnInputs(target_tokens=[12, 13, 14, 15], weights=[0.0, 0.0, 0.5, 0.25]),
    )
    unweighted = Datum(  # no weights: every position counts with weight 1
        model_input=ModelInput(tokens=[21, 22, 23]), loss_fn_inputs=LossFnInputs(target_tokens=[22, 23, 24])
    )
    apart = [engine.forward_backward("run_a", [d]) for d in (weighted, unweighted)]
    together = engine.forward_backward("run_a", [weighted, unweighted])
    assert together.loss == pytest.approx(sum(r.loss for r in apart), rel=1e-5)
    assert together.num_tokens == 2 + 3
    expected = -(0.5 * apart[0].logprobs[0][2] + 0.25 * apart[0].logprobs[0][3])
    assert apart[0].loss == pytest.approx(expected, rel=1e-5)


def test_interleaved_runs_keep_their_own_gradients(engine, tiny_base):
    data = all_data(tiny_base.tokenizer)
    engine.create_run("alone", LORA, seed=6)
    engine.create_run("mixed", LORA, seed=6)
    engine.create_run("other", LORA, seed=7)
    train(engine, "alone", [data[:2]])
    engine.forward_backward("mixed", data[:2])
    engine.forward_backward("other", data[2:])  # between mixed's forward_backward and its step
    engine.optim_step("other", ADAM)
    engine.optim_step("mixed", ADAM)
    assert rel_diff(flat(adapter_weights(engine, "mixed")), flat(adapter_weights(engine, "alone"))) == 0


def test_optim_step_is_torch_adamw_with_clipping(engine, tiny_base):
    """The fused AdamW the engine steps with equals torch's reference (per-tensor loop) AdamW after
    clipping the gradient norm, with every hyperparameter the request sets."""
    engine.create_run("a", LORA, seed=3)
    params = engine._runs["a"].params
    shadow = [p.detach().clone().requires_grad_(True) for p in params]
    reference = torch.optim.AdamW(shadow, foreach=False)
    data = all_data(tiny_base.tokenizer)
    for step, adam in enumerate(
        [
            AdamParams(learning_rate=3e-2, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.1, grad_clip_norm=0.5),
            AdamParams(learning_rate=1e-2),
        ]
    ):
        engine.forward_backward("a", data[step : step + 2])
        for s, p in zip(shadow, params):
            s.grad = p.grad.clone()
        result = engine.optim_step("a", adam)
        norm = torch.nn.utils.clip_grad_norm_(
            shadow, adam.grad_clip_norm if adam.grad_clip_norm is not None else math.inf, foreach=False
        )
        for group in reference.param_groups:
            group.update(
                lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay
            )
        reference.step()
        assert result.grad_norm == pytest.approx(float(norm), rel=1e-5)
        for s, p in zip(shadow, params):
            torch.testing.assert_close(p.detach(), s.detach(), rtol=1e-5, atol=1e-7)
    assert engine._runs["a"].optimizer.param_groups[0]["fused"]


def lora_layer_state(engine, run_id: str) -> list[tuple]:
    """What each LoRA layer holds of a run besides its weights, and its weights' dtype and flags."""
    state = []
    for name, layer in engine.adapters.peft.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer) and run_id in layer.lora_A:
            dropout = layer.lora_dropout[run_id]
            state.append(
                (
                    name,
                    layer.r[run_id],
                    layer.lora_alpha[run_id],
                    layer.scaling[run_id],
                    layer.use_rslora[run_id],
                    layer.use_dora[run_id],
                    layer.lora_bias[run_id],
                    type(dropout),
                    getattr(dropout, "p", None),
                    dropout.training,
                    *[
                        (p.dtype, p.device, p.requires_grad, p.is_leaf)
                        for key in ("lora_A", "lora_B")
                        for p in getattr(layer, key)[run_id].parameters()
                    ],
                )
            )
    return state


@pytest.mark.parametrize("targets, dropout", [("all-linear", 0.0), (["q_proj", "down_proj"], 0.1)])
def test_runs_added_to_wrapped_layers_equal_peft_add_adapter(tiny_base, monkeypatch, targets, dropout):
    """A run created once the model's layers are LoRA layers skips peft's walks over every module
    and every adapter: the same seeded init on the same layers as peft's add_adapter, the same
    layer state, its parameters in the model's order, and it trains alike (that its checkpoint
    loads with plain peft: test_checkpoint_loads_with_plain_peft)."""
    import eztinker.engine.adapters as adapters_module

    lora = LoraConfig(rank=4, alpha=16, dropout=dropout, target_modules=targets)

    def runs(fast: bool):
        monkeypatch.setattr(adapters_module, "_UPDATE_LAYER_TAKES_CONFIG", fast)
        engine = Engine(tiny_base)
        added = []
        original = engine.adapters._add_to_wrapped_layers
        monkeypatch.setattr(
            engine.adapters, "_add_to_wrapped_layers", lambda *a: added.append(original(*a)) or added[-1]
        )
        engine.create_run("first", LoraConfig(rank=2, alpha=8), seed=1)
        engine.create_run("second", lora, seed=5)
        weights, state = adapter_weights(engine, "second"), lora_layer_state(engine, "second")
        in_model_order = [p for n, p in engine.adapters.peft.named_parameters() if ".second." in n]
        assert [id(p) for p in engine._runs["second"].params] == [id(p) for p in in_model_order]
        torch.manual_seed(0)  # LoRA dropout draws from the global generator
        loss = train(engine, "second", [all_data(tiny_base.tokenizer)] * 2)[-1]
        engine.close()
        return added, weights, state, loss

    fast_added, fast_weights, fast_state, fast_loss = runs(True)
    slow_added, slow_weights, slow_state, slow_loss = runs(False)
    assert fast_added == [True] and slow_added == [False]
    assert fast_weights.keys() == slow_weights.keys()
    for key in fast_weights:
        torch.testing.assert_close(fast_weights[key], slow_weights[key], rtol=0, atol=0)
    assert fast_state == slow_state and len(fast_state) == (14 if targets == "all-linear" else 4)
    assert fast_loss == pytest.approx(slow_loss, rel=1e-6)


def test_runs_on_a_bf16_model_get_float32_adapters(tiny_model_dir, tmp_path):
    """peft's add_adapter upcasts a bf16 model's new adapters to float32 (stable training); the
    first run (get_peft_model) and later ones (added to the wrapped layers) alike."""
    base = load_base_model(str(tiny_model_dir), cache_dir=tmp_path, device="cpu", dtype=torch.bfloat16)
    engine = Engine(base)
    for run_id in ("first", "second"):
        engine.create_run(run_id, LORA, seed=3)
    assert {p.dtype for run in engine._runs.values() for p in run.params} == {torch.float32}
    assert adapter_weights(engine, "first").keys() == adapter_weights(engine, "second").keys()
    for key, value in adapter_weights(engine, "first").items():  # the same seed: the same init
        torch.testing.assert_close(value, adapter_weights(engine, "second")[key], rtol=0, atol=0)
    assert next(base.model.parameters()).dtype == torch.bfloat16
    engine.close()


def test_score_batches_responses_of_different_lengths(engine, tiny_base):
    tok = tiny_base.tokenizer
    engine.create_run("run_a", LORA)
    train(engine, "run_a", [all_data(tok)])
    prompt = render_prompt(tok, messages("Hello", "")[:1])
    responses = [tok.encode("Hi there, nice to meet you."), tok.encode("Yo"), [], tok.encode("Good day")]
    for run_id in ("run_a", None):
        together = engine.score(run_id, prompt, responses)
        alone = [engine.score(run_id, prompt, [r])[0] for r in responses]
        assert [s.num_tokens for s in together] == [len(r) for r in responses]
        assert [s.sum_logprob for s in together] == pytest.approx([s.sum_logprob for s in alone], rel=1e-5)
        assert together[0].mean_logprob == pytest.approx(together[0].sum_logprob / len(responses[0]))
        assert together[2].sum_logprob == 0.0


def test_score_micro_batches_many_responses_within_the_token_bound(engine, tiny_base):
    """Scoring used to pad every response into one batch (256 x 512 tokens: +700 MB). Every
    forward pass now holds at most `microbatch_tokens` padded tokens, with the same scores."""
    engine.microbatch_tokens = 64
    prompt = [100, 200, 300]
    responses = [[(7 * i + j) % 1000 + 10 for j in range(1 + i % 9)] for i in range(40)] + [[]]
    alone = [engine.score(None, prompt, [r])[0].sum_logprob for r in responses]
    shapes, forward = [], engine.forward.hidden_states  # every forward pass of the decoder goes through it
    engine.forward.hidden_states = lambda adapter, input_ids, mask: (
        shapes.append(input_ids.shape) or forward(adapter, input_ids, mask)
    )
    try:
        together = engine.score(None, prompt, responses)
    finally:
        del engine.forward.hidden_states
    assert len(shapes) > 1 and all(rows * width <= 64 for rows, width in shapes), shapes
    assert sum(rows for rows, _ in shapes) == len(responses)
    assert [s.sum_logprob for s in together] == pytest.approx(alone, rel=1e-5)


# --------------------------------------------------------------------------- 3. checkpoints
@pytest.mark.parametrize("where", ["same_engine", "restarted_server"])
def test_save_load_resume_matches_uninterrupted_training(engine, tiny_base, tiny_model_dir, tmp_path, where):
    data = all_data(tiny_base.tokenizer)
    batches = [data[:2], data[2:], data[1:3], [data[0], data[3]]]
    engine.create_run("straight", LORA, seed=1)
    uninterrupted = train(engine, "straight", batches)

    engine.create_run("first", LORA, seed=1)
    assert train(engine, "first", batches[:1]) == pytest.approx(uninterrupted[:1], rel=1e-6)
    engine.save("first", tmp_path / "ckpt")
    assert train(engine, "first", batches[1:2]) == pytest.approx(uninterrupted[1:2], rel=1e-6)
    engine.save("first", tmp_path / "ckpt")  # overwrites the step-1 checkpoint
    engine.delete_run("first")

    if where == "restarted_server":  # a new process: fresh base weights and a fresh engine
        engine = Engine(load_base_model(str(tiny_model_dir), cache_dir=tmp_path / "cache", device="cpu"))
    engine.create_run("resumed", LORA, seed=42)  # a different init: load must replace it
    assert engine.load("resumed", tmp_path / "ckpt") == 2
    assert engine.step_of("resumed") == 2
    resumed = train(engine, "resumed", batches[2:])
    # Equal only if the AdamW moments came back too: a fresh optimizer takes a different step.
    assert resumed == pytest.approx(uninterrupted[2:], rel=1e-6, abs=1e-6)
    assert engine.step_of("resumed") == 4


def test_load_refuses_a_checkpoint_of_another_lora_config(engine, tmp_path):
    engine.create_run("run_a", LORA)
    engine.save("run_a", tmp_path / "ckpt")
    engine.create_run("run_b", LoraConfig(rank=2, alpha=16))
    with pytest.raises(EngineError, match="LoRA config"):
        engine.load("run_b", tmp_path / "ckpt")
    with pytest.raises(EngineError, match="not a readable"):
        engine.load("run_a", tmp_path / "missing")


def test_checkpoint_loads_with_plain_peft(engine, tiny_base, tiny_model_dir, tmp_path):
    tok = tiny_base.tokenizer
    engine.create_run("other", LORA, seed=9)
    engine.create_run("run_b", LORA, seed=2)  # not the first adapter of the peft model
    train(engine, "run_b", [all_data(tok)] * 3)
    train(engine, "other", [all_data(tok)[:1]])
    engine.save("run_b", tmp_path / "ckpt")

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ckpt").eval()
    prompt, reply = prompt_and_reply(tok, *CONVERSATIONS[2])
    input_ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        want = loaded(input_ids=input_ids).logits
        with loaded.disable_adapter():
            bare = loaded(input_ids=input_ids).logits
        engine.adapters.peft.set_adapter("run_b")
        got = engine.adapters.peft(input_ids=input_ids).logits
    assert (want - bare).abs().max() > 1e-3  # the adapter was trained: the comparison means something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # The same through the engine's public scoring.
    logprobs = torch.log_softmax(want[0, len(prompt) - 1 : -1], dim=-1)
    expected = float(logprobs.gather(-1, torch.tensor(reply).unsqueeze(-1)).sum())
    assert reply_logprob(engine, "run_b", prompt, reply) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ 5. isolation
def test_runs_are_isolated_from_each_other_and_the_base(engine, tiny_base):
    tok = tiny_base.tokenizer
    prompt, reply = prompt_and_reply(tok, *CONVERSATIONS[0])
    model = tiny_base.model
    base_ptrs = {p.data_ptr() for p in model.parameters()}
    base_count = sum(p.numel() for p in model.parameters())
    expected_lora = lora_param_count(model, LORA.rank)
    base_score = reply_logprob(engine, None, prompt, reply)

    engine.create_run("run_a", LORA, seed=1)
    engine.create_run("run_b", LORA, seed=2)
    # No base weight was copied: the same storage, and only LoRA parameters were added.
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    other = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert {p.data_ptr() for p in other} == base_ptrs
    assert sum(p.numel() for p in model.parameters()) == base_count + 2 * expected_lora
    assert sum(p.numel() for p in lora_params) == 2 * expected_lora

    train(engine, "run_b", [[chat_datum(tok, *CONVERSATIONS[1])]] * 2)
    b_before = reply_logprob(engine, "run_b", prompt, reply)
    b_weights = flat(adapter_weights(engine, "run_b"))
    assert reply_logprob(engine, None, prompt, reply) == pytest.approx(base_score, abs=1e-6)

    train(engine, "run_a", [[chat_datum(tok, *CONVERSATIONS[0])]] * 3)
    assert reply_logprob(engine, "run_a", prompt, reply) > base_score + 1.0  # run A did change
    assert reply_logprob(engine, "run_b", prompt, reply) == pytest.approx(b_before, abs=1e-6)
    assert rel_diff(flat(adapter_weights(engine, "run_b")), b_weights) == 0
    assert reply_logprob(engine, None, prompt, reply) == pytest.approx(base_score, abs=1e-6)


# ----------------------------------------------------------------- 6. sampling after training
def test_greedy_sample_reproduces_the_trained_reply(engine, tiny_base):
    tok = tiny_base.tokenizer
    user, reply_text = CONVERSATIONS[0]
    prompt, reply = prompt_and_reply(tok, user, reply_text)
    engine.create_run("run_a", LORA)
    assert greedy(engine, "run_a", prompt).tokens != reply  # untrained: the base model's answer

    train(engine, "run_a", [[chat_datum(tok, user, reply_text)]] * 16)  # reproduces it from ~11 steps
    trained = greedy(engine, "run_a", prompt)
    assert trained.tokens == reply  # ends with <|im_end|>, which stops sampling
    assert trained.stop_reason == "stop"
    assert trained.text == reply_text
    base = greedy(engine, None, prompt)
    assert base.tokens != reply
    assert base.tokens[: len(reply)] != reply[: len(base.tokens)]


# ---------------------------------------------------------------------------- 8. bad input
def test_token_ids_outside_the_vocabulary_are_refused(engine, tiny_base):
    vocab = tiny_base.vocab_size
    engine.create_run("run_a", LORA)
    good = datum_from_tokens([1, 2, 3], [4, 5])
    bad_input = datum_from_tokens([1, vocab, 3], [4, 5])
    bad_target = datum_from_tokens([1, 2, 3], [4, vocab + 7])
    with pytest.raises(EngineError, match=r"data\[1\]\.model_input\.tokens.*" + str(vocab)):
        engine.forward_backward("run_a", [good, bad_input])
    with pytest.raises(EngineError, match=r"data\[0\]\.loss_fn_inputs\.target_tokens"):
        engine.forward_backward("run_a", [bad_target])
    negative = Datum(model_input=ModelInput(tokens=[1, -1]), loss_fn_inputs=LossFnInputs(target_tokens=[2, 3]))
    with pytest.raises(EngineError, match=r"model_input\.tokens.*-1"):
        engine.forward_backward("run_a", [negative])
    with pytest.raises(EngineError, match=r"prompts\[1\]"):
        engine.sample([SampleSpec("run_a", [[1, 2], [vocab]], 1, SamplingParams(max_tokens=2))])
    with pytest.raises(EngineError, match=r"^prompt: token id -3 "):
        engine.score("run_a", [1, -3], [[2]])
    with pytest.raises(EngineError, match=r"^responses\[2\]: token id " + str(vocab + 1)):
        engine.score("run_a", [1, 2], [[3], [], [4, vocab + 1]])
    assert adapter_grads(engine, "run_a").abs().sum() == 0  # nothing was accumulated


def test_unknown_run_is_refused(engine, tmp_path):
    datum = datum_from_tokens([1, 2, 3], [4])
    with pytest.raises(EngineError, match="unknown run nope"):
        engine.forward_backward("nope", [datum])
    engine.create_run("run_a", LORA)
    calls = [
        lambda: engine.forward_backward("nope", [datum]),
        lambda: engine.optim_step("nope", ADAM),
        lambda: engine.score("nope", [1, 2], [[3]]),
        lambda: engine.sample([SampleSpec("nope", [[1, 2]], 1, SamplingParams(max_tokens=2))]),
        lambda: engine.save("nope", tmp_path / "x"),
        lambda: engine.load("nope", tmp_path / "x"),
        lambda: engine.step_of("nope"),
        lambda: engine.delete_run("nope"),
    ]
    for call in calls:
        with pytest.raises(EngineError, match="unknown run nope"):
            call()
    with pytest.raises(EngineError, match="already exists"):
        engine.create_run("run_a", LORA)
    assert not (tmp_path / "x").exists()


def test_unknown_target_modules_are_refused_and_leave_the_engine_usable(engine, tiny_base):
    bad = LoraConfig(target_modules=["no_such_module"])
    with pytest.raises(EngineError, match="target_modules"):
        engine.create_run("run_x", bad)  # first run: the peft wrapper is being created
    assert not engine.has_run("run_x")
    engine.create_run("run_a", LORA)
    with pytest.raises(EngineError, match="target_modules"):
        engine.create_run("run_x", bad)  # a further adapter
    assert not engine.has_run("run_x")
    engine.create_run("run_x", LORA)
    losses = train(engine, "run_x", [all_data(tiny_base.tokenizer)[:1]] * 2)
    assert losses[1] < losses[0]


@pytest.mark.parametrize("poison", ["huge_advantage", "inf_ratio"])
def test_non_finite_loss_is_refused_and_leaves_gradients_unchanged(engine, tiny_base, poison):
    tok = tiny_base.tokenizer
    engine.create_run("run_a", LORA)
    train(engine, "run_a", [all_data(tok)])  # lora_B nonzero: every LoRA tensor gets gradients
    engine.forward_backward("run_a", all_data(tok)[:2])
    grads = adapter_grads(engine, "run_a")
    assert grads.abs().sum() > 0

    # A long healthy example (its own, first, micro-batch) and a short poisoned one after it, so
    # the failure comes after some gradient has already been accumulated.
    long = all_data(tok)[2]
    n = len(long.model_input.tokens)
    healthy = rl_datum(long.model_input.tokens, long.loss_fn_inputs.target_tokens, [-5.0] * n, [1.0] * n)
    if poison == "huge_advantage":
        bad = rl_datum([1, 2, 3], [2, 3, 4], [-30.0] * 3, [3e38] * 3)  # ratio >> 1: past float32's max
    else:
        bad = rl_datum([1, 2, 3], [2, 3, 4], [-1e30] * 3, [1.0] * 3)  # exp(logprob - (-1e30)) = inf
    engine.microbatch_tokens = n
    assert len(microbatches([healthy, bad], engine.microbatch_tokens)) == 2
    with pytest.raises(EngineError, match="not finite"):
        engine.forward_backward("run_a", [healthy, bad], loss_fn="importance_sampling")
    assert torch.equal(adapter_grads(engine, "run_a"), grads)

    # The run is still usable: the next step applies exactly the earlier gradients.
    assert engine.optim_step("run_a", ADAM).step == 2


# ------------------------------------------------------------------ 9. RL loss functions
@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_rl_loss_on_policy_is_minus_token_count_and_raises_logprobs(engine, tiny_base, loss_fn):
    tok = tiny_base.tokenizer
    prompt, reply = prompt_and_reply(tok, *CONVERSATIONS[2])
    engine.create_run("rl", LORA, seed=4)
    engine.create_run("probe", LORA, seed=4)  # same weights: reads the current logprobs
    tokens, targets = (prompt + reply)[:-1], (prompt + reply)[1:]
    start = len(prompt) - 1
    ce = engine.forward_backward("probe", [datum_from_tokens(prompt, reply)])
    current = [lp if lp is not None else 0.0 for lp in ce.logprobs[0]]
    advantages = [0.0] * start + [1.0] * len(reply)

    result = engine.forward_backward("rl", [rl_datum(tokens, targets, current, advantages)], loss_fn=loss_fn)
    assert result.num_tokens == len(reply)
    assert result.loss == pytest.approx(-len(reply), rel=1e-5)
    assert result.logprobs[0][start:] == pytest.approx(current[start:], rel=1e-5)
    # On-policy, d(ratio) = d(logprob): the same gradient as cross-entropy on those tokens.
    assert rel_diff(adapter_grads(engine, "rl"), adapter_grads(engine, "probe")) < 1e-4

    before = reply_logprob(engine, "rl", prompt, reply)
    engine.optim_step("rl", ADAM)
    assert reply_logprob(engine, "rl", prompt, reply) > before


def test_ppo_clips_the_ratio(engine, tiny_base):
    prompt, reply = prompt_and_reply(tiny_base.tokenizer, *CONVERSATIONS[0])
    engine.create_run("rl", LORA)
    tokens, targets = (prompt + reply)[:-1], (prompt + reply)[1:]
    start = len(prompt) - 1
    stale = [0.0] * start + [-50.0] * len(reply)  # the current policy is far more likely: ratio >> 1.2
    advantages = [0.0] * start + [1.0] * len(reply)
    result = engine.forward_backward("rl", [rl_datum(tokens, targets, stale, advantages)], loss_fn="ppo")
    assert result.loss == pytest.approx(-1.2 * len(reply), rel=1e-5)
    assert adapter_grads(engine, "rl").abs().sum() == 0  # clipped: no gradient


# -------------------------------------------------------------------------- 10. run lifecycle
def test_delete_and_recreate_runs(engine, tiny_base):
    tok = tiny_base.tokenizer
    prompt, reply = prompt_and_reply(tok, *CONVERSATIONS[0])
    datum = chat_datum(tok, *CONVERSATIONS[0])
    base_score = reply_logprob(engine, None, prompt, reply)

    engine.create_run("run_a", LORA)
    engine.create_run("run_b", LORA)
    train(engine, "run_a", [[datum]] * 2)
    engine.delete_run("run_a")  # the active adapter, while another run remains
    assert not engine.has_run("run_a")
    with pytest.raises(EngineError, match="unknown run run_a"):
        engine.score("run_a", prompt, [reply])
    engine.create_run("run_a", LORA)  # the same id again: a fresh adapter at step 0
    assert engine.step_of("run_a") == 0
    assert reply_logprob(engine, "run_a", prompt, reply) == pytest.approx(base_score, abs=1e-5)

    engine.delete_run("run_a")
    engine.delete_run("run_b")  # the last run: the base model is restored
    assert not any("lora_" in n for n, _ in tiny_base.model.named_parameters())
    assert reply_logprob(engine, None, prompt, reply) == pytest.approx(base_score, abs=1e-6)

    engine.create_run("run_c", LORA)
    losses = train(engine, "run_c", [[datum]] * 3)
    assert losses[-1] < losses[0]
    assert reply_logprob(engine, "run_c", prompt, reply) > base_score
    assert reply_logprob(engine, None, prompt, reply) == pytest.approx(base_score, abs=1e-6)
    assert greedy(engine, "run_c", prompt, max_tokens=3).tokens
    assert math.isfinite(engine.optim_step("run_c", ADAM).grad_norm)


# ------------------------------------------------------------ 11. fast paths of the engine
@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo"])
def test_hand_written_projection_gradient_equals_autograd(engine, tiny_base, loss_fn):
    """The chunked output projection with its hand-written logits gradient gives the loss, the
    logprobs and the adapter gradient that autograd through full logits gives."""
    data = all_data(tiny_base.tokenizer)
    if loss_fn != "cross_entropy":
        rng = torch.Generator().manual_seed(0)
        data = [
            rl_datum(
                d.model_input.tokens,
                d.loss_fn_inputs.target_tokens,
                (-12 - 2 * torch.rand(len(d.model_input.tokens), generator=rng)).tolist(),  # stale: ratios vary
                [0.0 if i % 3 == 0 else float(i % 5) - 2 for i in range(len(d.model_input.tokens))],
            )
            for d in data
        ]
    engine.create_run("fast", LORA, seed=2)
    engine.create_run("reference", LORA, seed=2)
    for run_id in ("fast", "reference"):  # one identical step: lora_B nonzero
        train(engine, run_id, [all_data(tiny_base.tokenizer)])
    engine.logits_chunk = 5  # several chunks per micro-batch
    fast = engine.forward_backward("fast", data, loss_fn=loss_fn)
    assert engine.forward._head is not None
    engine.forward._head = None  # as for a model whose head the engine cannot apply itself: autograd path
    reference = engine.forward_backward("reference", data, loss_fn=loss_fn)

    assert fast.loss == pytest.approx(reference.loss, rel=1e-5)
    assert fast.num_tokens == reference.num_tokens
    for got, want in zip(fast.logprobs, reference.logprobs):
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx(
            [w for w in want if w is not None], rel=1e-5, abs=1e-5
        )
    assert adapter_grads(engine, "reference").abs().sum() > 0
    assert rel_diff(adapter_grads(engine, "fast"), adapter_grads(engine, "reference")) < 1e-5


def test_score_with_the_fused_head_equals_the_model_logits(engine, tiny_base):
    tok = tiny_base.tokenizer
    prompt, reply = prompt_and_reply(tok, *CONVERSATIONS[0])
    engine.create_run("run_a", LORA)
    train(engine, "run_a", [all_data(tok)])
    with torch.no_grad():
        logits = engine.adapters.peft(input_ids=torch.tensor([prompt + reply])).logits[0].log_softmax(-1)
    want = sum(float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(reply))
    assert reply_logprob(engine, "run_a", prompt, reply) == pytest.approx(want, rel=1e-5)


def test_length_buckets_pad_little_and_respect_the_token_budget(engine):
    lengths = [
        109,
        119,
        120,
        126,
        137,
        144,
        144,
        147,
        148,
        148,
        159,
        164,
        166,
        166,
        170,
        178,
        185,
        186,
        195,
        200,
        201,
        201,
        210,
        218,
        220,
        222,
        227,
        232,
        257,
        259,
        274,
        374,
    ]
    data = [datum_from_tokens([1] * (n // 2), [2] * (n - n // 2 + 1)) for n in lengths]
    engine.microbatch_tokens = 8192
    batches = microbatches(data, engine.microbatch_tokens)
    assert sorted(i for b in batches for i in b) == list(range(len(data)))
    widths = [max(lengths[i] for i in b) for b in batches]
    assert all(w * len(b) <= 8192 for w, b in zip(widths, batches))
    assert all(lengths[b[0]] == w for w, b in zip(widths, batches))  # longest first
    padded = sum(w * len(b) for w, b in zip(widths, batches))
    assert padded <= 1.15 * sum(lengths)  # one bucket padded to 374 would be 1.7x
