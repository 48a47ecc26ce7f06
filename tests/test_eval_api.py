"""Scoring prompts over the OpenAI API (`echo`) and the tokenizer over HTTP (vLLM's `/tokenize`,
`/detokenize`, `/tokenizer_info`), as lm-eval and the `openai` client use them, on one in-process
server over the tiny model."""

from __future__ import annotations

import httpx
import openai
import pytest
from support import train

from eztinker import Datum, LossFnInputs, ModelInput, ServiceClient
from eztinker.launcher import ThreadedServer, build_service
from eztinker.server.settings import ServerSettings

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-api")
    settings = ServerSettings(data_dir=root / "data", device="cpu", model=[str(tiny_model_dir)])
    with ThreadedServer(build_service(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def trained_run(server):
    """A run trained a few steps (its adapter no longer the identity), with a checkpoint."""
    sdk = ServiceClient(server.url)
    run = sdk.create_training_run(lora_rank=4)
    train(run, 3)
    run.save_state("three").result(timeout=60)
    return run


def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def tokenize(server, text: str) -> list[int]:
    return httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]


def forward_logprobs(run, tokens: list[int]) -> list[float]:
    """The training path's logprob of tokens[1:], each given those before it."""
    datum = Datum(
        model_input=ModelInput(tokens=tokens[:-1]),
        loss_fn_inputs=LossFnInputs(target_tokens=tokens[1:], weights=[1.0] * (len(tokens) - 1)),
    )
    return run.forward([datum]).result(timeout=60).logprobs[0]


def test_echo_scores_the_prompt_with_max_tokens_zero(server):
    client = oa(server)
    model = server.service.default_model
    tokens = tokenize(server, TEXT)
    out = client.completions.create(model=model, prompt=TEXT, echo=True, logprobs=1, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == TEXT and choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(tokens) == len(lp.token_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == TEXT and lp.text_offset[0] == 0
    assert [TEXT[o : o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    for logprob, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) == 1 and max(top.values()) >= logprob  # the most likely token is never less likely
    assert out.usage.prompt_tokens == len(tokens) and out.usage.completion_tokens == 0

    # Token-id prompts and lists of prompts (lm-eval sends ids in batches); n copies of each.
    batch = client.completions.create(
        model=model, prompt=[tokens, tokens[:4]], echo=True, logprobs=0, max_tokens=0, n=2
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert batch.choices[2].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:4], abs=1e-4)
    assert batch.choices[0].text == TEXT and batch.choices[0].logprobs.top_logprobs is None

    one = client.completions.create(model=model, prompt=tokens[:1], echo=True, logprobs=2, max_tokens=0)
    assert one.choices[0].logprobs.token_logprobs == [None] and one.choices[0].logprobs.top_logprobs == [None]

    # echo without logprobs: the text alone.
    plain = client.completions.create(model=model, prompt=TEXT, echo=True, max_tokens=0)
    assert plain.choices[0].text == TEXT and plain.choices[0].logprobs is None


def test_echo_with_generation_as_lm_eval_asks(server):
    """lm-eval's loglikelihood payload: echo, logprobs 1, max_tokens 1, temperature 0, ids."""
    model = server.service.default_model
    tokens = tokenize(server, TEXT)
    body = {
        "model": model,
        "prompt": [tokens],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    out = httpx.post(server.url + "/v1/completions", json=body).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(tokens) + 1  # the prompt, then the one generated token
    scored = oa(server).completions.create(model=model, prompt=tokens, echo=True, logprobs=1, max_tokens=0)
    assert lp["token_logprobs"][:-1][1:] == pytest.approx(scored.choices[0].logprobs.token_logprobs[1:], abs=1e-4)
    # Greedy: the generated token is the most likely one, and its text follows the prompt's.
    last_top = lp["top_logprobs"][-1]
    assert lp["token_logprobs"][-1] == pytest.approx(max(last_top.values()), abs=1e-5)
    assert out["choices"][0]["text"] == "".join(lp["tokens"])
    assert out["usage"]["completion_tokens"] == 1


def test_echoed_logprobs_equal_forward(server, trained_run):
    """The same tokens scored by echo (live adapter, checkpoint, bare model) and by the training
    path's forward agree; and the trained adapter scores differently from the bare model."""
    client = oa(server)
    tokens = tokenize(server, TEXT)
    expected = forward_logprobs(trained_run, tokens)
    for name in (trained_run.run_id, f"{trained_run.run_id}/three"):
        echoed = client.completions.create(model=name, prompt=tokens, echo=True, logprobs=0, max_tokens=0)
        assert echoed.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4), name
    bare = client.completions.create(
        model=server.service.default_model, prompt=tokens, echo=True, logprobs=0, max_tokens=0
    )
    assert bare.choices[0].logprobs.token_logprobs[1:] != pytest.approx(expected, abs=1e-4)


def test_echo_refusals_name_their_field(server):
    client = oa(server)
    model = server.service.default_model
    cases = [
        (dict(prompt=TEXT, max_tokens=0), "max_tokens"),  # 0 only with echo
        (dict(prompt=TEXT, echo=True, max_tokens=0, stream=True), "stream"),
        (dict(prompt=[10**7], echo=True, max_tokens=0, logprobs=1), "prompt"),
        (dict(prompt=TEXT, echo=True, max_tokens=-1), "max_tokens"),
        (dict(prompt=TEXT, echo=True, max_tokens=0, logprobs=50), "logprobs"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=model, **kwargs)
        assert caught.value.body["param"] == param, (kwargs, caught.value.body)
    with pytest.raises(openai.BadRequestError):  # chat keeps max_tokens >= 1
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=0)


def test_tokenizer_endpoints_round_trip(server, tiny_model_dir):
    from transformers import AutoTokenizer

    local = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = tokenize(server, TEXT)
    assert tokens == local.encode(TEXT, add_special_tokens=False)
    full = httpx.post(server.url + "/tokenize", json={"prompt": TEXT, "return_token_strs": True}).json()
    assert full["count"] == len(full["tokens"]) and full["token_strs"] == local.convert_ids_to_tokens(full["tokens"])
    assert full["max_model_len"] > 0
    back = httpx.post(server.url + "/detokenize", json={"tokens": tokens}).json()
    assert back == {"prompt": TEXT}
    eos = local.eos_token
    assert tokenize(server, eos) == [local.eos_token_id]  # special tokens in text are recognised (lm-eval's eos)
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert (
        chat["tokens"]
        == local.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )

    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == eos and info["chat_template"] == local.chat_template
    assert info["model"] == server.service.default_model

    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**7]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    bad = httpx.post(server.url + "/tokenize", json={"prompt": "x", "model": "no-such-model"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
    bad = httpx.post(server.url + "/tokenize", json={})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_lm_eval_detects_the_remote_tokenizer(server):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    assert check_remote_tokenizer_support(server.url + "/v1/completions")
    remote = RemoteTokenizer(server.url + "/v1/completions")
    assert remote.decode(remote.encode(TEXT)) == TEXT and remote.eos_token_id is not None


def test_evaluations_are_recorded_per_adapter(server, trained_run):
    url = f"{server.url}/v1/runs/{trained_run.run_id}/evaluations"
    report = {"tasks": ["arc_easy"], "scores": {"arc_easy": {"acc,none": 0.5}}, "harness": "lm-eval 0.4.13"}
    live = httpx.post(url, json=report).json()
    saved = httpx.post(url, json={**report, "checkpoint": "three"}).json()
    assert (live["checkpoint"], live["step"]) == (None, 3) and (saved["checkpoint"], saved["step"]) == ("three", 3)
    listed = httpx.get(url).json()
    assert [e["id"] for e in listed][-2:] == [live["id"], saved["id"]] and listed[-1]["scores"] == report["scores"]

    assert httpx.post(url, json={**report, "checkpoint": "nope"}).status_code == 404
    stray = httpx.post(url, json={**report, "scores": {"mmlu": {"acc,none": 0.1}}})
    assert stray.status_code == 422 and stray.json()["detail"][0]["loc"] == ["body", "scores"]
    assert httpx.post(url, json={**report, "scores": {"arc_easy": {"acc,none": "NaN"}}}).status_code == 422
    assert httpx.get(f"{server.url}/v1/runs/run_missing/evaluations").status_code == 404


def test_prompt_scorings_fuse_across_adapters(server, trained_run):
    """Scorings of one base model run as one batch (grouped by adapter inside it), each command's
    answer the same as alone; they never fuse with samples."""
    from eztinker.backend.commands import Sample, ScorePrompts, fusable
    from eztinker.types import SamplingParams

    base = server.service.default_model
    bare = ScorePrompts(model=base, prompts=[[11, 12, 13, 14], [15, 16]], topk=2)
    tuned = ScorePrompts(model=base, run_id=trained_run.run_id, prompts=[[11, 12, 13, 14]])
    assert fusable(bare, tuned)
    assert not fusable(bare, Sample(model=base, prompts=[[1]], num_samples=1, sampling_params=SamplingParams()))
    together = server.service.backend.execute([bare, tuned])
    alone = [server.service.backend.execute([c])[0] for c in (bare, tuned)]
    for fused, single in zip(together, alone):
        assert (
            fused.error is None
            and fused.value.model_dump(exclude_none=True).keys() == single.value.model_dump(exclude_none=True).keys()
        )
        for a, b in zip(fused.value.prompt_logprobs, single.value.prompt_logprobs):
            assert a[0] is None and a[1:] == pytest.approx(b[1:], abs=1e-4)
    assert [len(top) for top in together[0].value.topk_prompt_logprobs[0][1:]] == [2, 2, 2]
    assert together[1].value.topk_prompt_logprobs is None
    # The run's adapter scores differently from the bare model.
    assert together[1].value.prompt_logprobs[0][1:] != pytest.approx(together[0].value.prompt_logprobs[0][1:], abs=1e-4)
