"""What the Tinker protocol asks of the engine, on the tiny random Qwen2: the RL losses and their
config, forward-only passes, logprobs at every position, sampling from saved snapshots, prompt
logprobs. CPU only, offline, no mocks of the model."""

from __future__ import annotations

import random

import pytest
import torch
from support import TINY_BPE_TOKENS

from eztinker.backend.commands import CreateRun, ForwardBackward, OptimStep, Sample, Save
from eztinker.backend.local import LocalBackend
from eztinker.chat import datum_from_tokens
from eztinker.engine import Engine, EngineError
from eztinker.types import AdamParams, Datum, LoraConfig, LossFnInputs, ModelInput, SamplingParams

LORA = LoraConfig(rank=4, alpha=16)
DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, "beta": 0.05}


@pytest.fixture()
def engine(tiny_base):
    engine = Engine(tiny_base)
    yield engine
    engine.close()  # snapshots too: the session's base model must come back bare


@pytest.fixture()
def backend(tiny_base):
    backend = LocalBackend([tiny_base])
    yield backend
    for engine in backend.engines.values():
        engine.close()
    backend.close()


def test_the_backend_warms_its_engines_up_and_the_constructor_does_not(tiny_base, backend):
    """Packing and timing the base weights (packed_linear.py) is `Engine.warm_up`'s, which the
    backend calls once for each engine it builds: a bare Engine has packed and timed nothing."""
    assert Engine(tiny_base).forward._packs == {}
    warmed = backend.engines[tiny_base.name].forward
    assert warmed._head_checked and warmed._plain_version is not None
    assert len(warmed._packs) > 1  # the head and the decoder's projections, packed or found not to pay


# ----------------------------------------------------------------------------------- helpers
def random_tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(300, TINY_BPE_TOKENS) for _ in range(n)]


def twin_runs(engine, *names: str) -> None:
    """Runs with one identical random adapter (lora_B nonzero, so every LoRA tensor has a gradient)."""
    for name in names:
        engine.create_run(name, LORA)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in engine._runs[name].params:
                param.normal_(0.0, 0.05, generator=generator)


def model_logprobs(engine, run_id: str | None, tokens: list[int]) -> torch.Tensor:
    """[T, V] log-softmax of the model's own logits (through peft) at every position."""
    with engine.adapters.through(run_id):
        logits = engine.adapters.peft(input_ids=torch.tensor([tokens])).logits[0]
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
    engine.forward.output_head()
    engine.forward._head = None


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
            lps = [
                model_logprobs(engine, "reference", d.model_input.tokens).gather(
                    -1, torch.tensor(d.loss_fn_inputs.target_tokens)[:, None]
                )[:, 0]
                for d in data
            ]
        default = sum(float(formula(loss_fn, {}, lp, d)) for lp, d in zip(lps, data))
        assert default != pytest.approx(want, rel=1e-3)


def test_ppo_and_cispo_default_thresholds_are_0_8_and_1_2(engine):
    twin_runs(engine, "a")
    data = make_data(engine, "a", "ppo")
    for loss_fn in ("ppo", "cispo"):
        implicit = engine.forward_backward("a", data, loss_fn, forward_only=True).loss
        explicit = engine.forward_backward(
            "a",
            data,
            loss_fn,
            forward_only=True,
            loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        )
        assert implicit == explicit.loss


@pytest.mark.parametrize(
    "loss_fn, config, accepted",
    [
        ("ppo", {"beta": 0.1}, "clip_low_threshold, clip_high_threshold"),
        ("dro", {"clip_low_threshold": 0.9}, "beta"),
        ("cross_entropy", {"beta": 0.1}, "none"),
    ],
)
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
        assert [g for g, b in zip(got, before) if b is not None] == pytest.approx(
            [b for b in before if b is not None], abs=1e-6
        )
        with torch.no_grad():
            want = model_logprobs(engine, "full", datum.model_input.tokens).gather(
                -1, torch.tensor(datum.loss_fn_inputs.target_tokens)[:, None]
            )[:, 0]
        assert got == pytest.approx(want.tolist(), abs=1e-4)


# ----------------------------------------------------------------------------- snapshots
PROMPT = [1000, 2000, 3000, 4000, 5000]


def greedy(max_tokens: int = 8, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def execute(backend, *commands):
    outcomes = backend.execute(list(commands))
    assert [o.error for o in outcomes] == [None] * len(commands)
    return [o.value.model_dump(exclude_none=True) for o in outcomes]  # as stored and served


def train_steps(backend, model: str, run_id: str, reply: list[int], steps: int) -> None:
    datum = datum_from_tokens(PROMPT, reply)
    for _ in range(steps):
        execute(backend, ForwardBackward(model=model, run_id=run_id, data=[datum]))
        execute(backend, OptimStep(model=model, run_id=run_id, adam_params=AdamParams(learning_rate=2e-2)))


def assert_same_samples(got: dict, want: dict) -> None:
    """Identical tokens; logprobs equal but for float rounding, which depends on the batch."""
    assert got["prompt_tokens"] == want["prompt_tokens"]
    for got_row, want_row in zip(got["sequences"], want["sequences"], strict=True):
        assert [c["tokens"] for c in got_row] == [c["tokens"] for c in want_row]
        for g, w in zip(got_row, want_row):
            assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-5)


def sample_tokens(backend, model: str, *, run_id=None, snapshot=None, **params) -> list[int]:
    command = Sample(
        model=model, run_id=run_id, snapshot=snapshot, prompts=[PROMPT], num_samples=1, sampling_params=greedy(**params)
    )
    return execute(backend, command)[0]["sequences"][0][0]["tokens"]


def test_a_snapshot_samples_the_saved_weights_however_the_run_trains_on(backend, tiny_base, tmp_path):
    model = tiny_base.name
    execute(backend, CreateRun(model=model, run_id="a", lora=LORA))
    train_steps(backend, model, "a", [7000, 7001, 7002, 7003], steps=3)
    saved = sample_tokens(backend, model, run_id="a")
    assert saved != sample_tokens(backend, model)  # the base model's
    checkpoint = tmp_path / "a" / "ckpt"
    execute(backend, Save(model=model, run_id="a", directory=str(checkpoint)))

    assert sample_tokens(backend, model, snapshot=str(checkpoint)) == saved
    train_steps(backend, model, "a", [9000, 9001, 9002, 9003], steps=3)
    assert sample_tokens(backend, model, run_id="a") != saved
    assert sample_tokens(backend, model, snapshot=str(checkpoint)) == saved
    engine = backend.engine(model)
    (name,) = engine.snapshots
    assert not engine.has_run(name)  # never a run: not trainable, not listed
    (outcome,) = backend.execute([ForwardBackward(model=model, run_id=name, data=[datum_from_tokens(PROMPT, [1])])])
    assert outcome.error == f"unknown run {name}"


def test_snapshots_and_live_runs_fuse_in_one_batch_equal_to_each_alone(backend, tiny_base, tmp_path, monkeypatch):
    model = tiny_base.name
    checkpoints = {}
    for run_id, reply in (("a", [7000, 7001, 7002]), ("b", [9000, 9001, 9002])):
        execute(backend, CreateRun(model=model, run_id=run_id, lora=LORA, seed=len(checkpoints)))
        train_steps(backend, model, run_id, reply, steps=3)
        checkpoints[run_id] = str(tmp_path / run_id / "ckpt")
        execute(backend, Save(model=model, run_id=run_id, directory=checkpoints[run_id]))
    train_steps(backend, model, "a", [5, 6, 7], steps=2)
    commands = [
        Sample(model=model, snapshot=checkpoints["a"], prompts=[PROMPT], num_samples=1, sampling_params=greedy()),
        Sample(model=model, run_id="a", prompts=[PROMPT, PROMPT[:3]], num_samples=1, sampling_params=greedy()),
        Sample(
            model=model,
            run_id="b",
            snapshot=checkpoints["b"],
            prompts=[PROMPT[1:]],
            num_samples=2,
            sampling_params=SamplingParams(temperature=1.0, max_tokens=6, seed=3),
        ),
        Sample(model=model, snapshot=checkpoints["a"], prompts=[PROMPT[2:]], num_samples=1, sampling_params=greedy(5)),
    ]
    engine = backend.engine(model)
    batches = []
    sample = engine.sample
    monkeypatch.setattr(engine, "sample", lambda specs: batches.append(len(specs)) or sample(specs))

    together = execute(backend, *commands)
    alone = [execute(backend, c)[0] for c in commands]
    assert batches == [4, 1, 1, 1, 1]  # really one fused batch
    for got, want in zip(together, alone):
        assert_same_samples(got, want)
    first = [v["sequences"][0][0]["tokens"] for v in together[:3]]
    assert len({tuple(t) for t in first}) == 3  # three different adapters

    loads = []
    load = engine.snapshots._load
    monkeypatch.setattr(engine.snapshots, "_load", lambda *args: loads.append(args) or load(*args))
    execute(backend, *commands)
    assert loads == []  # cached


def test_snapshot_cache_refreshes_overwritten_checkpoints_and_evicts_the_least_recent(backend, tiny_base, tmp_path):
    model = tiny_base.name
    engine = backend.engine(model)
    engine.max_snapshots = 2
    execute(backend, CreateRun(model=model, run_id="a", lora=LORA))
    paths, outputs = [], []
    for reply in ([7000, 7001, 7002], [9000, 9001, 9002], [5, 6, 7]):
        train_steps(backend, model, "a", reply, steps=3)
        paths.append(str(tmp_path / "a" / f"ckpt{len(paths)}"))
        execute(backend, Save(model=model, run_id="a", directory=paths[-1]))
        outputs.append(sample_tokens(backend, model, run_id="a"))
    assert len({tuple(o) for o in outputs}) == 3

    # Three snapshots in one batch though two are kept: none is evicted before it has sampled.
    batch = [Sample(model=model, snapshot=p, prompts=[PROMPT], num_samples=1, sampling_params=greedy()) for p in paths]
    assert [v["sequences"][0][0]["tokens"] for v in execute(backend, *batch)] == outputs
    assert len(engine.snapshots) == 3
    sample_tokens(backend, model, snapshot=paths[0])
    sample_tokens(backend, model, snapshot=paths[2])  # a cached one: no eviction
    assert len(engine.snapshots) == 3
    execute(backend, Save(model=model, run_id="a", directory=paths[1]))  # overwritten: the latest weights
    assert sample_tokens(backend, model, snapshot=paths[1]) == outputs[2]
    assert len(engine.snapshots) == 2  # ckpt1's old adapter dropped, and the least recent one evicted
    assert sample_tokens(backend, model, snapshot=paths[0]) == outputs[0]
    engine.close()
    assert not any("lora_" in n for n, _ in tiny_base.model.named_parameters())


# ------------------------------------------------------------------------- prompt logprobs
@pytest.mark.parametrize("path", ["hand_written", "autograd"])
def test_prompt_logprobs_equal_the_models_own_and_top_k_starts_at_the_argmax(backend, tiny_base, tmp_path, path):
    model = tiny_base.name
    engine = backend.engine(model)
    execute(backend, CreateRun(model=model, run_id="a", lora=LORA))
    train_steps(backend, model, "a", [7000, 7001, 7002], steps=2)
    checkpoint = str(tmp_path / "a" / "ckpt")
    execute(backend, Save(model=model, run_id="a", directory=checkpoint))
    train_steps(backend, model, "a", [9000, 9001, 9002], steps=2)
    if path == "autograd":
        use_autograd_head(engine)
    prompts = [PROMPT, [42, 43], [77]]
    k = 3

    def request(**kwargs):
        return Sample(model=model, prompts=prompts, num_samples=1, sampling_params=greedy(2), **kwargs)

    live, snap, bare, plain, topk_only = execute(
        backend,
        request(run_id="a", prompt_logprobs=True, topk_prompt_logprobs=k),
        request(snapshot=checkpoint, prompt_logprobs=True, topk_prompt_logprobs=k),
        request(prompt_logprobs=True, topk_prompt_logprobs=k),
        request(run_id="a"),
        request(topk_prompt_logprobs=1),
    )
    snapshot_adapter = next(iter(engine.snapshots))
    for value, adapter in ((live, "a"), (snap, snapshot_adapter), (bare, None)):
        for prompt, logprobs, topk in zip(prompts, value["prompt_logprobs"], value["topk_prompt_logprobs"]):
            assert len(logprobs) == len(topk) == len(prompt)
            assert logprobs[0] is None and topk[0] is None
            with torch.no_grad():
                want_T_V = model_logprobs(engine, adapter, prompt)
            for i in range(1, len(prompt)):
                assert logprobs[i] == pytest.approx(float(want_T_V[i - 1, prompt[i]]), abs=1e-4)
                values, ids = want_T_V[i - 1].topk(k)
                assert [t for t, _ in topk[i]] == ids.tolist()  # the argmax first
                assert [lp for _, lp in topk[i]] == pytest.approx(values.tolist(), abs=1e-4)
    assert live["prompt_logprobs"] != snap["prompt_logprobs"] != bare["prompt_logprobs"]
    assert "prompt_logprobs" not in plain and "topk_prompt_logprobs" not in plain
    assert "prompt_logprobs" not in topk_only and [len(row[1]) for row in topk_only["topk_prompt_logprobs"][:2]] == [
        1,
        1,
    ]
    # Engine.score agrees: the prompt's tail given its head.
    score = engine.score("a", PROMPT[:2], [PROMPT[2:]])[0].sum_logprob
    assert score == pytest.approx(sum(live["prompt_logprobs"][0][2:]), abs=1e-4)


def test_prompt_scoring_extras_equal_the_models_own_logprobs(backend, tiny_base):
    """prompt_logprobs_last_n, target ids' logprobs and alternative-token draws at prompt positions
    (Tinker's asample fields), under a trained adapter, against the model's own log-softmax."""
    model = tiny_base.name
    engine = backend.engine(model)
    execute(backend, CreateRun(model=model, run_id="a", lora=LORA))
    train_steps(backend, model, "a", [7000, 7001, 7002], steps=2)
    prompts = [[11, 22, 33, 44, 55, 66], [77, 88]]
    targets = [[[5, 6], [], [7], [8, 9, 10], [11]], [[12, 13]]]

    def request(temperature=1.0, seed=3, **kwargs):
        return Sample(
            model=model,
            run_id="a",
            prompts=prompts,
            num_samples=1,
            prompt_logprobs=True,
            sampling_params=SamplingParams(max_tokens=1, temperature=temperature, seed=seed),
            **kwargs,
        )

    value, again, other_seed, greedy_draws = execute(
        backend,
        request(topk_prompt_logprobs=2, prompt_logprobs_last_n=1, prompt_targets=targets, prompt_alt_tokens_k=5),
        request(prompt_alt_tokens_k=5),
        request(seed=4, prompt_alt_tokens_k=5),
        request(temperature=0, prompt_alt_tokens_k=3),
    )
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            want_T_V = model_logprobs(engine, "a", prompt)
        # last_n = 1: only the last prompt token is scored, top-k likewise.
        assert value["prompt_logprobs"][i][:-1] == [None] * (len(prompt) - 1)
        assert value["prompt_logprobs"][i][-1] == pytest.approx(float(want_T_V[-2, prompt[-1]]), abs=1e-4)
        assert value["topk_prompt_logprobs"][i][:-1] == [None] * (len(prompt) - 1)
        assert [t for t, _ in value["topk_prompt_logprobs"][i][-1]] == want_T_V[-2].topk(2).indices.tolist()
        for row, (ids, got) in enumerate(zip(targets[i], value["target_prompt_logprobs"][i], strict=True)):
            assert got == pytest.approx(want_T_V[row, ids].tolist(), abs=1e-4)
        alt = value["prompt_alt_tokens"][i]
        assert len(alt["tokens"]) == len(prompt) - 1 and all(len(r) == 5 for r in alt["tokens"])
        for row, (tokens, logprobs) in enumerate(zip(alt["tokens"], alt["logprobs"])):
            assert logprobs == pytest.approx(want_T_V[row, tokens].tolist(), abs=1e-4)
        assert again["prompt_alt_tokens"][i] == alt  # the same seed draws the same
        # Temperature 0 draws the most likely token every time.
        argmax = want_T_V[: len(prompt) - 1].argmax(-1).tolist()
        assert greedy_draws["prompt_alt_tokens"][i]["tokens"] == [[t] * 3 for t in argmax]
    assert other_seed["prompt_alt_tokens"] != value["prompt_alt_tokens"]
    assert "target_prompt_logprobs" not in again and "prompt_alt_tokens" not in (execute(backend, request())[0])


def test_ignore_eos_samples_past_the_models_end_token(backend, tiny_base):
    """A run trained to answer with the end-of-text token stops there; with ignore_eos (Tinker's
    stop=[]) it samples on to max_tokens, its first token still that end token."""
    model = tiny_base.name
    eos = min(tiny_base.stop_token_ids)
    execute(backend, CreateRun(model=model, run_id="eos", lora=LORA))
    train_steps(backend, model, "eos", [eos], steps=8)

    def sample(**params):
        command = Sample(
            model=model, run_id="eos", prompts=[PROMPT], num_samples=1, sampling_params=greedy(5, **params)
        )
        return execute(backend, command)[0]["sequences"][0][0]

    stopped, went_on = sample(), sample(ignore_eos=True)
    assert stopped["tokens"] == [eos] and stopped["stop_reason"] == "stop"
    assert went_on["tokens"][0] == eos and len(went_on["tokens"]) == 5 and went_on["stop_reason"] == "length"
    # The request's own stop tokens still stop it.
    assert sample(ignore_eos=True, stop_token_ids=[eos])["tokens"] == [eos]


def test_a_non_finite_gradient_fails_its_request_and_keeps_earlier_gradients(engine, tiny_base):
    """Hole 7: a valid forward_backward, then a ppo one whose sampler logprobs are -1e308 (finite
    loss, non-finite gradient): the second fails naming the problem, the first's gradient stays."""
    engine.create_run("nan", LoraConfig(rank=2))
    good = Datum(model_input=ModelInput(tokens=[1, 2, 3]), loss_fn_inputs=LossFnInputs(target_tokens=[2, 3, 4]))
    engine.forward_backward("nan", [good])
    grads = [None if p.grad is None else p.grad.clone() for p in engine._runs["nan"].params]
    bad = Datum(
        model_input=ModelInput(tokens=[1, 2, 3]),
        loss_fn_inputs=LossFnInputs(target_tokens=[2, 3, 4], logprobs=[-1e308] * 3, advantages=[1.0] * 3),
    )
    with pytest.raises(EngineError, match="non-finite gradient"):
        engine.forward_backward("nan", [bad], "ppo")
    after = [p.grad for p in engine._runs["nan"].params]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, after))
    assert engine.optim_step("nan", AdamParams()).step == 1  # the valid batch is applied
