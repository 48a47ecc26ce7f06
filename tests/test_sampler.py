"""Sampler correctness: greedy equals transformers' generate, batching and mixed-run batches do not
change results, seeds, candidates, max_tokens, stop strings, top-k/top-p. CPU only, offline.

The conftest's tiny random Qwen2 has such small weights that its greedy output just repeats the
prompt's last token, which would hide padding/position/cache bugs. Most tests therefore use a
"sharp" copy whose decoder matrices are re-drawn with a larger scale: same architecture,
tokenizer and loading path, but prompt-dependent, varied greedy continuations.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from support import TINY_BPE_TOKENS
from transformers import AutoModelForCausalLM, GenerationConfig

from eztinker.chat import datum_from_tokens
from eztinker.engine import Engine, SampleSpec, load_base_model
from eztinker.tiny import copy_tokenizer
from eztinker.types import AdamParams, LoraConfig, SamplingParams

LORA = LoraConfig(rank=4, alpha=16)


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sharp_base(tiny_model_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.model.layers.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.25, generator=generator)
    out = tmp_path_factory.mktemp("sharp-qwen2")
    model.save_pretrained(out)
    copy_tokenizer(tiny_model_dir, out)
    return load_base_model(str(out), cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")


@pytest.fixture()
def sharp(sharp_base):
    engine = Engine(sharp_base)
    yield engine
    for run_id in list(engine._runs):
        engine.delete_run(run_id)


# ----------------------------------------------------------------------------------- helpers
def params(**kwargs) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 12, **kwargs})


def sample_one(engine, adapter, prompts, num_samples=1, **kwargs):
    """engine.sample for a single spec: per prompt, its candidates."""
    return engine.sample([SampleSpec(adapter, prompts, num_samples, params(**kwargs))])[0]


def tokens_of(candidates_per_prompt) -> list[list[list[int]]]:
    return [[c.tokens for c in candidates] for candidates in candidates_per_prompt]


def random_prompts(lengths, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(300, TINY_BPE_TOKENS) for _ in range(n)] for n in lengths]


def hf_greedy(model, base, prompt, max_tokens, repetition_penalty=1.0) -> list[int]:
    config = GenerationConfig(
        do_sample=False,
        repetition_penalty=repetition_penalty,  # 1.0: else the model's generation_config (Qwen2: 1.1) is merged in
        max_new_tokens=max_tokens,
        eos_token_id=sorted(base.stop_token_ids),
        pad_token_id=base.pad_token_id,
    )
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt) :].tolist()


def train_away(engine, run_id, seed, steps=4, lora=LORA):
    """Train a run on a random reply so that its greedy outputs differ from the base model's."""
    engine.create_run(run_id, lora, seed=seed)
    prompt, reply = random_prompts([6, 8], seed=100 + seed)
    datum = datum_from_tokens(prompt, reply)
    for _ in range(steps):
        engine.forward_backward(run_id, [datum])
        engine.optim_step(run_id, AdamParams(learning_rate=3e-2))


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("which", ["tiny_base", "sharp_base"])
def test_base_greedy_equals_transformers_generate(which, request):
    base = request.getfixturevalue(which)
    engine = Engine(base)  # no runs: the bare model
    prompts = random_prompts([5, 13]) + [base.tokenizer.encode("The quick brown fox")]
    got = tokens_of(sample_one(engine, None, prompts, max_tokens=8))
    assert got == [[hf_greedy(base.model, base, p, 8)] for p in prompts]


def test_greedy_with_runs_equals_generate_with_adapter_on_and_off(sharp, sharp_base):
    train_away(sharp, "run_a", seed=1)
    sharp.create_run("run_b", LORA, seed=2)
    prompts = random_prompts([4, 11], seed=3)
    with sharp.adapters.peft.disable_adapter():
        want_base = [hf_greedy(sharp.adapters.peft, sharp_base, p, 10) for p in prompts]
    sharp.adapters.peft.set_adapter("run_a")
    want_a = [hf_greedy(sharp.adapters.peft, sharp_base, p, 10) for p in prompts]
    assert want_a != want_base
    assert tokens_of(sample_one(sharp, "run_b", prompts[:1], max_tokens=1))  # make run_b active
    assert tokens_of(sample_one(sharp, None, prompts, max_tokens=10)) == [[t] for t in want_base]
    assert tokens_of(sample_one(sharp, "run_a", prompts, max_tokens=10)) == [[t] for t in want_a]


def test_batched_greedy_with_left_padding_equals_each_prompt_alone(sharp):
    prompts = random_prompts([2, 7, 15, 31])
    batched = tokens_of(sample_one(sharp, None, prompts))
    alone = [tokens_of(sample_one(sharp, None, [p]))[0] for p in prompts]
    assert batched == alone
    assert len({tuple(c[0]) for c in batched}) == len(prompts)  # prompt-dependent output


def test_greedy_candidates_share_the_prefill_correctly(sharp):
    prompts = random_prompts([3, 9])
    single = tokens_of(sample_one(sharp, None, prompts))
    many = sample_one(sharp, None, prompts, num_samples=3)
    assert [len(c) for c in many] == [3, 3]
    assert tokens_of(many) == [[s[0]] * 3 for s in single]


def test_seeded_sampling_is_reproducible_and_seeds_differ(sharp):
    prompts = random_prompts([4, 10])
    kwargs = dict(num_samples=3, temperature=1.0, max_tokens=6)
    first = sample_one(sharp, None, prompts, seed=7, **kwargs)
    again = sample_one(sharp, None, prompts, seed=7, **kwargs)
    other = sample_one(sharp, None, prompts, seed=8, **kwargs)
    assert [len(c) for c in first] == [3, 3]  # num_samples candidates per prompt
    assert tokens_of(first) == tokens_of(again)
    assert [[c.logprobs for c in cs] for cs in first] == [[c.logprobs for c in cs] for cs in again]
    assert tokens_of(first) != tokens_of(other)
    for candidates in first:
        assert len({tuple(c.tokens) for c in candidates}) == 3  # candidates are independent draws
        for c in candidates:
            assert len(c.tokens) == len(c.logprobs) == 6 and c.stop_reason == "length"
            assert all(lp <= 0 for lp in c.logprobs)


def test_sampled_logprobs_are_the_models_own(sharp):
    train_away(sharp, "run_a", seed=1)
    prompt = random_prompts([6])[0]
    for adapter in ("run_a", None):
        for kwargs in ({"temperature": 0}, {"temperature": 0.7, "seed": 3}):
            seq = sample_one(sharp, adapter, [prompt], max_tokens=8, **kwargs)[0][0]
            score = sharp.score(adapter, prompt, [seq.tokens])[0]
            assert sum(seq.logprobs) == pytest.approx(score.sum_logprob, rel=1e-4, abs=1e-4)


def test_top_k_1_and_tiny_top_p_equal_greedy(sharp):
    prompts = random_prompts([3, 12])
    want = tokens_of(sample_one(sharp, None, prompts, max_tokens=6))
    assert tokens_of(sample_one(sharp, None, prompts, max_tokens=6, temperature=1.0, top_k=1, seed=1)) == want
    assert tokens_of(sample_one(sharp, None, prompts, max_tokens=6, temperature=1.5, top_p=1e-6, seed=2)) == want
    assert tokens_of(sample_one(sharp, None, prompts, max_tokens=6, temperature=1.0, seed=1)) != want


def test_max_tokens_and_stop_strings(sharp, sharp_base):
    tokenizer = sharp_base.tokenizer
    prompt = random_prompts([5])[0]
    full = sample_one(sharp, None, [prompt], max_tokens=20)[0][0]
    assert full.stop_reason == "length" and len(full.tokens) == 20
    assert full.text == tokenizer.decode(full.tokens, skip_special_tokens=True)
    short = sample_one(sharp, None, [prompt], max_tokens=3)[0][0]
    assert short.tokens == full.tokens[:3] and short.stop_reason == "length"

    # A stop string: the text that the k-th generated token adds (k >= 2, first occurrence).
    for k in range(2, 20):
        before = tokenizer.decode(full.tokens[:k])
        upto = tokenizer.decode(full.tokens[: k + 1])
        piece = upto[len(before) :]
        if upto.startswith(before) and piece.strip() and "\ufffd" not in upto and upto.find(piece) == len(before):
            break
    else:
        pytest.fail(f"no usable stop string in {full.text!r}")
    stopped = sample_one(sharp, None, [prompt], max_tokens=20, stop=["never-generated-xyz", piece])[0][0]
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == full.tokens[: k + 1]
    assert stopped.text == before
    assert piece not in stopped.text
    unused = sample_one(sharp, None, [prompt], max_tokens=20, stop=["never-generated-xyz"])[0][0]
    assert unused.tokens == full.tokens and unused.stop_reason == "length"


def test_stop_token_ids_stop_right_after_the_token(sharp):
    prompts = random_prompts([5, 9], seed=2)
    full = [c[0] for c in sample_one(sharp, None, prompts, max_tokens=16)]
    # Per prompt, a token that first appears k >= 2 tokens in; both requests stop on both tokens.
    firsts = [next(t for k, t in enumerate(c.tokens) if k >= 2 and t not in c.tokens[:k]) for c in full]
    stopped = [c[0] for c in sample_one(sharp, None, prompts, max_tokens=16, stop_token_ids=firsts)]
    for candidate, reference in zip(stopped, full):
        k = next(k for k, t in enumerate(reference.tokens) if t in firsts)
        assert candidate.tokens == reference.tokens[: k + 1]  # the stop token included
        assert candidate.stop_reason == "stop"
        assert candidate.text == sharp.base.tokenizer.decode(reference.tokens[:k], skip_special_tokens=True)
    # Another request in the same batch does not stop on them.
    specs = [
        SampleSpec(None, prompts, 1, params(max_tokens=16, stop_token_ids=firsts)),
        SampleSpec(None, prompts, 1, params(max_tokens=16)),
    ]
    together = [tokens_of(r) for r in sharp.sample(specs)]
    assert together == [tokens_of([[c] for c in stopped]), tokens_of([[c] for c in full])]


def test_mixed_batch_of_runs_and_base_equals_each_spec_alone(sharp):
    train_away(sharp, "run_a", seed=1)
    # Another rank and other target modules: peft's per-row adapter path must handle both.
    train_away(sharp, "run_b", seed=2, lora=LoraConfig(rank=2, alpha=8, target_modules=["q_proj", "v_proj"]))
    p = random_prompts([3, 8, 14, 6], seed=5)
    specs = [
        SampleSpec("run_a", [p[0], p[1]], 1, params(max_tokens=10)),
        SampleSpec(None, [p[2]], 2, params(max_tokens=6)),
        SampleSpec("run_b", [p[0], p[3]], 1, params(max_tokens=12)),
        SampleSpec("run_a", [p[3]], 1, params(max_tokens=4)),
        SampleSpec("run_b", [p[1]], 3, params(temperature=1.0, seed=11, max_tokens=5)),
    ]
    mixed = [tokens_of(r) for r in sharp.sample(specs)]
    alone = [tokens_of(sharp.sample([spec])[0]) for spec in specs]
    assert mixed == alone
    # The three models really answer differently, so a wrong adapter per row would show.
    first = {name: tokens_of(sample_one(sharp, name, [p[0]]))[0][0] for name in ("run_a", "run_b", None)}
    assert len({tuple(t) for t in first.values()}) == 3


def test_shared_prompt_prefix_is_prefilled_once_per_adapter_without_changing_results(sharp, monkeypatch):
    """Prompts that start alike (a system prompt, worked examples) prefill their common prefix
    once per adapter; the candidates equal each prompt sampled alone, where nothing is shared."""
    train_away(sharp, "run_a", seed=1)
    train_away(sharp, "run_b", seed=2)
    prefix = random_prompts([20], seed=7)[0]
    tails = random_prompts([1, 6, 13], seed=8)
    prompts = [prefix + tail for tail in tails] + [prefix[:12]]  # the last one is shorter than the prefix
    specs = [
        SampleSpec("run_a", prompts, 2, params(max_tokens=8)),
        SampleSpec(None, prompts[:2], 1, params(max_tokens=8)),
        SampleSpec("run_b", prompts[1:3], 1, params(temperature=1.0, seed=3, max_tokens=8)),
    ]
    widths = []
    forward = sharp.forward._features_fn

    def recording(stacked):
        inner = forward(stacked)

        def record(input_ids, *args):
            widths.append(tuple(input_ids.shape))
            return inner(input_ids, *args)

        return record

    monkeypatch.setattr(sharp.forward, "_features_fn", recording)
    together = [r for r in sharp.sample(specs)]
    # First pass: the 11 shared tokens (the shortest prompt keeps its 12th), one row per adapter.
    assert widths[0] == (3, 11)
    alone = [
        sharp.sample([SampleSpec(spec.adapter, [p], spec.num_samples, spec.params)])[0][0]
        for spec in specs
        for p in spec.prompts
    ]
    flat = [candidates for per_spec in together for candidates in per_spec]
    assert tokens_of(flat[:-2]) == tokens_of(alone[:-2])  # greedy: identical
    for got, want in zip(flat, alone):
        for g, w in zip(got, want):
            if g.tokens == w.tokens:
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)


# ------------------------------------------------------------------ fast paths of the sampler
def _chooser(params_list, vocab, rows):
    from eztinker.engine.sampler import _LogitsAreFeatures
    from eztinker.engine.token_chooser import TokenChooser

    specs = [SampleSpec(None, [[1]], 1, p) for p in params_list]
    return TokenChooser(specs, _LogitsAreFeatures(vocab), rows, torch.device("cpu"))


def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


@pytest.mark.parametrize("vocab", [300, 512])  # 300: a ragged last block; 512: whole blocks only
@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.3, top_k=7), dict(temperature=0.8, top_p=0.6)],
)
def test_inverse_cdf_draws_follow_the_requested_distribution(vocab, kwargs):
    """The block-then-inside inverse-CDF draw has exactly softmax(logits / T) (after top-k/top-p)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=generator, dtype=torch.float64) * 2
    logits[vocab - 3] = logits.max() + 0.5  # a likely token in the last block
    n = 60_000
    chooser = _chooser([SamplingParams(seed=1, **kwargs)], vocab, n)
    tokens, logprobs, _ = chooser.choose(logits.float().expand(n, vocab).contiguous(), [0] * n)

    scaled = logits / kwargs["temperature"]
    if kwargs.get("top_k"):
        scaled[scaled < scaled.topk(kwargs["top_k"]).values[-1]] = -math.inf
    if kwargs.get("top_p"):
        probs, order = scaled.softmax(-1).sort(descending=True)
        drop = (probs.cumsum(-1) - probs) >= kwargs["top_p"]
        scaled[order[drop]] = -math.inf
    want = scaled.softmax(-1)
    got = _frequencies(tokens, vocab)
    assert got[want == 0].sum() == 0  # never a token outside top-k / the nucleus
    sigma = (want * (1 - want) / n).sqrt()
    assert ((got - want).abs() <= 5 * sigma + 1e-4).all(), (got - want).abs().max()
    # Logprobs are the model's own (temperature 1), whatever the sampling parameters.
    assert torch.allclose(logprobs.double(), logits.log_softmax(-1)[tokens], atol=1e-4)


def test_seeded_draws_do_not_depend_on_batch_mates_or_chunking(monkeypatch):
    import eztinker.engine.token_chooser as token_chooser

    vocab, rows = 257, 40
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(seed=5, temperature=0.9), SamplingParams(temperature=0), SamplingParams(seed=6, top_p=0.9)]
    spec_of_row = [0] * 10 + [1] * 10 + [2] * 20
    together = _chooser(params, vocab, rows).choose(logits, spec_of_row)[0]
    monkeypatch.setattr(token_chooser, "_BUFFER_ELEMENTS", vocab * 7)  # rows in chunks of 7
    chunked = _chooser(params, vocab, rows).choose(logits, spec_of_row)[0]
    assert torch.equal(together, chunked)
    alone = _chooser(params[:1], vocab, 10).choose(logits[:10], [0] * 10)[0]
    assert torch.equal(together[:10], alone)
    assert torch.equal(together[10:20], logits[10:20].argmax(-1))


@pytest.mark.parametrize("vocab", [300, 512])
def test_greedy_choice_is_torch_argmax_including_ties(vocab):
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3))
    logits[0, 10] = logits[0, 200] = logits[0].max() + 1  # a tie: the first index wins
    logits[1, vocab - 1] = logits[1].max() + 1  # the max in the (possibly ragged) last block
    logits[2, :] = 0.5  # all equal
    tokens, logprobs, _ = _chooser([SamplingParams(temperature=0)], vocab, 6).choose(logits, [0] * 6)
    assert torch.equal(tokens, logits.argmax(-1))
    assert tokens[0] == 10 and tokens[2] == 0
    assert torch.allclose(logprobs, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_output_projection_in_column_blocks_equals_one_matmul(dtype, with_bias):
    """The head's logits, a block of vocabulary columns at a time, equal one matmul: every block
    written, the ragged last one included, with a bias and with weights of another dtype."""
    from eztinker.engine.output_projection import BLOCK_COLUMNS, logits_into

    generator = torch.Generator().manual_seed(0)
    vocab = 2 * BLOCK_COLUMNS + 37
    weight = torch.randn(vocab, 24, generator=generator).to(dtype)
    bias = torch.randn(vocab, generator=generator).to(dtype) if with_bias else None
    hidden = torch.randn(5, 24, generator=generator)
    out = torch.full((5, vocab), float("nan"))
    logits_into(out, hidden, weight, bias)
    want = torch.nn.functional.linear(hidden.to(dtype), weight, bias).float()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_full_model_logits_path_equals_the_fused_output_head(sharp):
    """Models whose head the sampler cannot reproduce fall back to the model's own logits: same results."""
    train_away(sharp, "run_a", seed=1)
    prompts = random_prompts([4, 9], seed=4)
    specs = [
        SampleSpec("run_a", prompts, 2, params(max_tokens=8)),
        SampleSpec(None, prompts[:1], 3, params(max_tokens=6, temperature=1.0, seed=3)),
    ]
    fused = [tokens_of(r) for r in sharp.sample(specs)]
    assert sharp.forward._head is not None  # the tiny Qwen2's plain linear head is used directly
    sharp.forward._head = None  # as for a model with logit soft-capping
    full = [tokens_of(r) for r in sharp.sample(specs)]
    assert full == fused


def test_stacked_lora_equals_peft_for_mixed_single_and_no_adapter(sharp):
    """The sampler's stacked-LoRA forward gives the logits of peft's own forward: each row through
    its own adapter (peft's `adapter_names=` path), one adapter for all rows, or none."""
    from eztinker.engine.kv_cache import PreallocatedCache

    train_away(sharp, "run_a", seed=1)
    train_away(sharp, "run_b", seed=2, lora=LoraConfig(rank=2, alpha=8, target_modules=["q_proj", "v_proj"]))
    head = sharp.forward.output_head()
    ids = torch.tensor(random_prompts([7] * 5, seed=9))
    mask = torch.ones_like(ids)
    positions = torch.arange(7).expand(5, 7)

    def ours(adapters):
        with torch.no_grad(), sharp.forward._stacked_lora(set(adapters) - {None}) as stacked:  # as in Engine.sample
            features = sharp.forward._features_fn(stacked)(ids, mask, positions, PreallocatedCache(16), adapters)
        return head.logits(features, torch.empty(5, head.vocab_size))

    def peft_reference(adapters):
        return sharp.forward._logits_fn()(ids, mask, positions, PreallocatedCache(16), adapters)

    for adapters in (
        ["run_a", "run_b", None, "run_a", "run_b"],
        ["run_a"] * 5,
        ["run_b"] * 5,
        [None] * 5,
        ["run_b", "run_b", "run_a", "run_a", "run_a"],
    ):
        assert torch.allclose(ours(adapters), peft_reference(adapters), atol=1e-4), adapters
    mixed = ours(["run_a", "run_b", None, "run_a", "run_b"])
    assert not torch.allclose(mixed[0], ours(["run_b"] * 5)[0], atol=1e-2)  # the adapters really differ


def test_finished_rows_leave_the_batch_without_changing_the_others(sharp, monkeypatch):
    """Rows that stop early are compacted out of the KV cache (or carried along) without
    affecting the rows still decoding."""
    import eztinker.engine.sampler as sampler_module

    prompts = random_prompts([3, 8, 5, 11], seed=6)
    specs = [SampleSpec(None, [p], 1, params(max_tokens=m)) for p, m in zip(prompts, [2, 9, 4, 12])]
    default = [tokens_of(r) for r in sharp.sample(specs)]
    monkeypatch.setattr(sampler_module, "_COMPACT_FRACTION", 1)  # only when every row finished
    carried = [tokens_of(r) for r in sharp.sample(specs)]
    monkeypatch.setattr(sampler_module, "_COMPACT_FRACTION", 10**6)  # on every finished row
    eager = [tokens_of(r) for r in sharp.sample(specs)]
    alone = [tokens_of(sharp.sample([s])[0]) for s in specs]
    assert default == carried == eager == alone
    assert [len(r[0][0]) for r in default] == [2, 9, 4, 12]


def test_candidates_sharing_one_copy_of_their_prompt_cache_equal_copying_it(sharp, monkeypatch):
    """The decode attention that reads a prompt's KV cache once for all its candidates (a shared
    system prefix, left padding, runs and the base model in one batch, rows finishing early and
    leaving the batch) gives what copying the cache to every candidate gives: the same seeded
    tokens and, to rounding, the same logprobs."""
    import eztinker.engine.prompt_attention as prompt_attention
    import eztinker.engine.sampler as sampler_module

    train_away(sharp, "run_a", seed=1)
    prefix = random_prompts([10], seed=9)[0]
    prompts = [prefix + tail for tail in random_prompts([2, 9, 17], seed=10)]
    specs = [
        SampleSpec("run_a", prompts, 4, params(temperature=1.0, seed=5, max_tokens=10)),
        SampleSpec(None, prompts[1:], 3, params(temperature=0.8, seed=6, max_tokens=7, stop_token_ids=[17, 101])),
        SampleSpec("run_a", prompts[:1], 2, params(max_tokens=9)),
    ]
    monkeypatch.setattr(sampler_module, "_COMPACT_FRACTION", 10**6)  # every finished row leaves at once
    monkeypatch.setattr(sampler_module, "_MIN_SHARED_ROW_TOKENS", 0)  # these few rows would be copied
    attended = []
    original = prompt_attention.SharedPromptCache.attend
    monkeypatch.setattr(
        prompt_attention.SharedPromptCache, "attend", lambda self, *args: attended.append(1) or original(self, *args)
    )
    shared = sharp.sample(specs)
    assert attended  # the decode steps took the shared path
    monkeypatch.setattr(sampler_module, "_worth_sharing", lambda prompts, candidates: False)
    attended.clear()
    copied = sharp.sample(specs)
    assert not attended
    monkeypatch.setattr(sampler_module, "_worth_sharing", lambda prompts, candidates: True)
    monkeypatch.setattr(prompt_attention, "_fused_kernel", lambda q: False)  # the parts by matmuls (off CPU)
    unfused = sharp.sample(specs)
    assert attended
    assert [tokens_of(r) for r in unfused] == [tokens_of(r) for r in copied]
    for got_spec, want_spec in zip(unfused, copied):
        for got, want in zip(got_spec, want_spec):
            for g, w in zip(got, want):
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    assert [tokens_of(r) for r in shared] == [tokens_of(r) for r in copied]
    for got_spec, want_spec in zip(shared, copied):
        for got, want in zip(got_spec, want_spec):
            for g, w in zip(got, want):
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    lengths = {len(c.tokens) for r in shared for cs in r for c in cs}
    assert len(lengths) > 1  # some rows stopped early


def test_repetition_penalty_and_min_p_as_vllm_and_transformers_define_them(sharp, sharp_base):
    prompts = random_prompts([5, 9], seed=3)
    plain = tokens_of(sample_one(sharp, None, prompts, max_tokens=10))
    for penalty in (1.5, 0.7):  # > 1 discourages repeats of prompt and output tokens, < 1 encourages them
        got = tokens_of(sample_one(sharp, None, prompts, max_tokens=10, repetition_penalty=penalty))
        assert got == [[hf_greedy(sharp_base.model, sharp_base, p, 10, repetition_penalty=penalty)] for p in prompts]
    assert got != plain  # 0.7: repeats now win
    # min_p = 1 keeps only the most likely token: greedy, whatever the temperature.
    assert tokens_of(sample_one(sharp, None, prompts, max_tokens=10, temperature=1.5, min_p=1.0, seed=4)) == plain
    assert tokens_of(sample_one(sharp, None, prompts, max_tokens=10, temperature=1.5, min_p=0.0, seed=4)) != plain


def test_min_tokens_holds_back_every_stop_and_ignore_eos_ignores_the_models_own(sharp, sharp_base, monkeypatch):
    prompt = random_prompts([7], seed=4)
    full = sample_one(sharp, None, prompt, max_tokens=12)[0][0].tokens
    k = next(k for k, t in enumerate(full) if k >= 2 and t not in full[:k])
    eos = full[k]
    monkeypatch.setattr(sharp_base, "stop_token_ids", frozenset({eos}))  # the model's end-of-turn token is now this
    stopped = sample_one(sharp, None, prompt, max_tokens=12)[0][0]
    assert stopped.tokens == full[: k + 1] and stopped.stop_reason == "stop"
    ignored = sample_one(sharp, None, prompt, max_tokens=12, ignore_eos=True)[0][0]
    assert ignored.tokens == full and ignored.stop_reason == "length"
    held = sample_one(sharp, None, prompt, max_tokens=12, min_tokens=k + 3)[0][0]
    assert held.tokens[:k] == full[:k] and eos not in held.tokens[: k + 3] and len(held.tokens) >= k + 3
    # The request's own stop tokens and stop strings are held back too.
    monkeypatch.setattr(sharp_base, "stop_token_ids", frozenset())
    held = sample_one(sharp, None, prompt, max_tokens=12, min_tokens=k + 3, stop_token_ids=[eos])[0][0]
    assert eos not in held.tokens[: k + 3] and len(held.tokens) >= k + 3
    text = sharp_base.tokenizer.decode(full[:1])
    early = sample_one(sharp, None, prompt, max_tokens=12, stop=[text])[0][0]
    late = sample_one(sharp, None, prompt, max_tokens=12, stop=[text], min_tokens=5)[0][0]
    assert len(early.tokens) == 1 and len(late.tokens) >= 5 and late.tokens[:5] == full[:5]
    with pytest.raises(ValueError, match="min_tokens"):
        params(max_tokens=4, min_tokens=5)


def test_a_cancelled_request_stops_decoding_at_the_next_step_and_leaves_the_others(sharp):
    prompts = random_prompts([5], seed=6)
    polls = 0

    def cancelled() -> bool:
        nonlocal polls
        polls += 1
        return polls > 3  # its consumer goes away after the third step

    specs = [
        SampleSpec(None, prompts, 2, params(max_tokens=40), cancelled=cancelled),
        SampleSpec(None, prompts, 1, params(max_tokens=40)),
    ]
    cut, kept = sharp.sample(specs)
    assert specs[0].abandoned and specs[1].abandoned is False
    assert [len(c.tokens) for c in cut[0]] == [4, 4]
    assert tokens_of(kept) == tokens_of(sample_one(sharp, None, prompts, max_tokens=40))
    assert [len(c.tokens) for c in kept[0]] == [40]
