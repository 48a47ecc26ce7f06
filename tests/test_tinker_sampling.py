"""asample's fields as the official SDK (`tinker` 0.38) sends them, each honoured and checked for
meaning against the tiny model's own log-softmax (transformers, outside the server): top-k logprobs
of sampled tokens, target ids' prompt logprobs (dense and sparse CSR), prompt_logprobs_last_n,
alternative-token draws, and stop=[] turning the end-of-text token off. A field the server cannot
honour fails its request with category `user`, naming it."""

from __future__ import annotations

import logging

import httpx
import pytest

tinker = pytest.importorskip("tinker", reason="the Tinker API needs the tinker package: pip install 'eztinker[tinker]'")
import torch  # noqa: E402
from tinker import types  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

PROMPT = [100, 200, 300, 400, 500, 600]
TOL = 2e-4


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from eztinker.launcher import ThreadedServer, build_service
    from eztinker.server.settings import ServerSettings

    settings = ServerSettings(
        model=[str(tiny_model_dir)], device="cpu", data_dir=tmp_path_factory.mktemp("tinker-sampling") / "data"
    )
    with ThreadedServer(build_service(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """[T, V] temperature-1 log-softmax of the tiny model at every position of `tokens`."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def logprobs(tokens: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([tokens])).logits[0].float().log_softmax(-1)

    return logprobs


@pytest.fixture(scope="module")
def service(server):
    import os

    os.environ.setdefault("TINKER_TELEMETRY", "0")
    client = tinker.ServiceClient(base_url=server.url, api_key="tml-sampling")
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def sampler(service, tiny_model_dir):
    return service.create_sampling_client(base_model=str(tiny_model_dir)).result()


def test_topk_sample_logprobs_are_the_models_top_k_at_each_sampled_position(sampler, reference):
    result = sampler.sample(
        types.ModelInput.from_ints(PROMPT),
        num_samples=2,
        topk_sample_logprobs=5,
        sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=11),
    ).result()
    for seq in result.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens) == 6
        want_T_V = reference(PROMPT + seq.tokens)
        for j, (token, logprob, top) in enumerate(zip(seq.tokens, seq.logprobs, seq.topk_logprobs)):
            row = want_T_V[len(PROMPT) - 1 + j]
            values, ids = row.topk(5)
            assert [t for t, _ in top] == ids.tolist()
            assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=TOL)
            assert logprob == pytest.approx(float(row[token]), abs=TOL)
    plain = sampler.sample(
        types.ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=types.SamplingParams(max_tokens=2)
    ).result()
    assert plain.sequences[0].topk_logprobs is None


@pytest.mark.parametrize("sparse", [False, True])
def test_target_prompt_logprobs_last_n_and_alt_tokens(sampler, reference, sparse):
    ids = torch.full((len(PROMPT) - 1, 3), -1)
    ids[0, 0], ids[2, 1], ids[2, 2], ids[4, 0] = 7, 8, 9000, PROMPT[5]
    targets = types.TensorData.from_torch_sparse(ids, pad_value=-1) if sparse else types.TensorData.from_torch(ids)
    assert (targets.sparse_crow_indices is not None) == sparse
    k = 4
    result = sampler.sample(
        types.ModelInput.from_ints(PROMPT),
        num_samples=1,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=2,
        prompt_logprobs_last_n=2,
        target_prompt_logprobs=targets,
        prompt_alt_tokens_k=k,
        sampling_params=types.SamplingParams(max_tokens=1, temperature=0.7, seed=5),
    ).result()
    want_T_V = reference(PROMPT)
    # prompt_logprobs_last_n=2: the last two prompt tokens scored, top-k too; the rest None.
    assert result.prompt_logprobs[:-2] == [None] * (len(PROMPT) - 2)
    assert result.prompt_logprobs[-2:] == pytest.approx([float(want_T_V[i - 1, PROMPT[i]]) for i in (4, 5)], abs=TOL)
    assert result.topk_prompt_logprobs[:-2] == [None] * (len(PROMPT) - 2)
    assert [t for t, _ in result.topk_prompt_logprobs[-1]] == want_T_V[4].topk(2).indices.tolist()
    # target ids: their logprobs in the request's shape and layout, 0.0 where it had -1.
    got = result.target_prompt_logprobs
    assert (got.sparse_crow_indices is not None) == sparse and got.shape == [len(PROMPT) - 1, 3]
    want = torch.zeros(len(PROMPT) - 1, 3)
    for r, c in (ids != -1).nonzero().tolist():
        want[r, c] = want_T_V[r, ids[r, c]]
    assert torch.allclose(got.to_torch(pad_value=0), want, atol=TOL)
    # alternative tokens: k draws per position 1 .. len - 1, each with the model's logprob of it.
    alt_tokens, alt_logprobs = result.prompt_alt_tokens.tokens.to_torch(), result.prompt_alt_tokens.logprobs.to_torch()
    assert list(alt_tokens.shape) == list(alt_logprobs.shape) == [len(PROMPT) - 1, k]
    assert torch.allclose(alt_logprobs, want_T_V[: len(PROMPT) - 1].gather(-1, alt_tokens), atol=TOL)


def test_alt_token_draws_follow_the_temperature_and_the_seed(sampler, reference):
    def draws(temperature: float, seed: int) -> torch.Tensor:
        result = sampler.sample(
            types.ModelInput.from_ints(PROMPT),
            num_samples=1,
            prompt_alt_tokens_k=64,
            sampling_params=types.SamplingParams(max_tokens=1, temperature=temperature, seed=seed),
        ).result()
        return result.prompt_alt_tokens.tokens.to_torch()

    first, again, other = draws(1.0, 1), draws(1.0, 1), draws(1.0, 2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    argmax = reference(PROMPT)[: len(PROMPT) - 1].argmax(-1)
    assert torch.equal(draws(0.0, 1), argmax[:, None].expand(-1, 64))  # temperature 0: the most likely token
    # How often the most likely token is drawn matches its probability at the request's temperature
    # (within 4 standard deviations of the binomial count, 5 positions x 64 draws).
    logprobs_T_V = reference(PROMPT)[: len(PROMPT) - 1]
    for temperature in (1.0, 0.05):
        p_T = (logprobs_T_V / temperature).softmax(-1).gather(-1, argmax[:, None]).squeeze(-1).double()
        hits = (draws(temperature, 3) == argmax[:, None]).sum().item()
        expected, spread = float((64 * p_T).sum()), float((64 * p_T * (1 - p_T)).sum().sqrt())
        assert abs(hits - expected) <= 4 * spread + 1, (temperature, hits, expected, spread)
    assert expected > 64  # at 0.05 the argmax is drawn often: the check above has power


def test_stop_empty_list_samples_past_the_end_token(service, tiny_model_dir):
    """A LoRA trained to answer with <|endoftext|> stops on it by default; stop=[] (SDK 0.38) turns
    every stop token off, the model's too: the candidate runs on to max_tokens."""
    training = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    eos = training.get_tokenizer().eos_token_id
    prompt = PROMPT[:3]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(prompt),
        loss_fn_inputs={"target_tokens": prompt[1:] + [eos], "weights": [0.0, 0.0, 1.0]},
    )
    for _ in range(10):
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = training.save_weights_and_get_sampling_client().result()

    def sample(**params):
        params = types.SamplingParams(max_tokens=4, temperature=0.0, **params)
        result = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=params).result()
        return result.sequences[0]

    stopped, went_on = sample(), sample(stop=[])
    assert stopped.tokens == [eos] and stopped.stop_reason == "stop"
    assert went_on.tokens[0] == eos and len(went_on.tokens) == 4 and went_on.stop_reason == "length"
    assert sample(stop=[eos]).tokens == [eos]  # a stop list still stops


# --------------------------------------------------------------------------- refusals
def _refusal(future) -> str:
    with pytest.raises(tinker.RequestFailedError) as err:
        future.result()
    assert err.value.category == types.RequestErrorCategory.User
    return str(err.value)


def test_fields_the_server_cannot_honour_fail_the_request_naming_them(service, sampler, tiny_model_dir):
    long = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=1)
    assert "prompt_logprobs_last_n" in _refusal(
        sampler.sample(long, 1, params, include_prompt_logprobs=True, prompt_logprobs_last_n=len(PROMPT))
    )
    wrong_rows = types.TensorData.from_torch(torch.tensor([[5]]))
    assert "target_prompt_logprobs" in _refusal(sampler.sample(long, 1, params, target_prompt_logprobs=wrong_rows))
    # record_stability_info is honoured (tests/test_tinker_losses.py): its sequences are recorded.
    stable = service.create_sampling_client(base_model=str(tiny_model_dir), record_stability_info=True).result()
    assert stable.sample(long, 1, params).result().sequences[0].sequence_id


def test_an_unknown_asample_field_is_refused_not_ignored(server, tiny_model_dir):
    """What no SDK sends today (a field from a later version, a typo) fails the request, named."""
    with httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": "tml-raw"}, timeout=30) as http:
        session = http.post("/create_session", json={}).json()["session_id"]
        sampler_id = http.post(
            "/create_sampling_session",
            json={"session_id": session, "sampling_session_seq_id": 0, "base_model": str(tiny_model_dir)},
        ).json()["sampling_session_id"]
        future = http.post(
            "/asample",
            json={
                "sampling_session_id": sampler_id,
                "seq_id": 0,
                "num_samples": 1,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
                "sampling_params": {"max_tokens": 1},
                "logit_bias": {"5": 10},
            },
        ).json()
        answer = http.post("/retrieve_future", json={"request_id": future["request_id"]}).json()
        assert answer["category"] == "user" and "logit_bias" in answer["error"]
        future = http.post(
            "/asample",
            json={
                "sampling_session_id": sampler_id,
                "seq_id": 1,
                "num_samples": 1,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
                "sampling_params": {"max_tokens": 1, "min_p": 0.1},
            },
        ).json()
        answer = http.post("/retrieve_future", json={"request_id": future["request_id"]}).json()
        assert answer["category"] == "user" and "sampling_params.min_p" in answer["error"]


def test_a_sampling_client_keeps_a_quarter_of_the_connection_cap_in_flight(make_server, tiny_model_dir):
    """Each sample in flight holds a connection polling for its result. The server tells the SDK to
    keep a quarter of `max_connections` in flight, so a burst of samples (the cookbook's math_rl sends
    400 a step) waits in the SDK instead of meeting uvicorn's cap with 503s and retries."""
    refusals = _Refusals()
    with make_server(max_connections=16) as server:
        logging.getLogger("uvicorn.error").addHandler(refusals)  # uvicorn's loggers do not reach the root
        config = httpx.post(f"{server.url}/api/v1/client/config", json={}, headers={"X-API-Key": "tml-burst"})
        assert config.json()["sample_max_concurrent_requests"] == 4
        service = tinker.ServiceClient(base_url=server.url, api_key="tml-burst")
        client = service.create_sampling_client(base_model=str(tiny_model_dir)).result()
        params = types.SamplingParams(max_tokens=16, temperature=1.0)
        futures = [
            client.sample(types.ModelInput.from_ints([100 + i, 200, 300]), num_samples=2, sampling_params=params)
            for i in range(48)
        ]
        assert all(len(f.result().sequences) == 2 for f in futures)
        service.close("success").result()
    logging.getLogger("uvicorn.error").removeHandler(refusals)
    assert refusals.count == 0, f"{refusals.count} requests met the connection cap"


class _Refusals(logging.Handler):
    """Counts uvicorn's 503s at its connection cap ("Exceeded concurrency limit.")."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "Exceeded concurrency limit" in record.getMessage()
