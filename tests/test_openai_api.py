"""The OpenAI-compatible API as a user meets it: the official `openai` client against the real
server (uvicorn in-process), runs trained through the EZTinker SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import EXAMPLE, PROMPT, train

from eztinker import AdamParams, ServiceClient, datum_from_tokens
from eztinker.launcher import ThreadedServer, build_service
from eztinker.server.settings import ServerSettings

CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """One server for the module (the tests only add runs of their own): alice and bob's keys."""
    root = tmp_path_factory.mktemp("openai")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"key-a": "alice", "key-b": "bob"}))
    settings = ServerSettings(data_dir=root / "data", device="cpu", model=[str(tiny_model_dir)], api_keys_file=keys)
    with ThreadedServer(build_service(settings)) as running:
        yield running


def client(server, key="key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def base_model(server) -> str:
    return server.service.default_model


def greedy(oa: openai.OpenAI, model: str, max_tokens: int = 4) -> list[float]:
    """The greedy continuation of the trained prompt, as token logprobs (text may not round-trip ids)."""
    out = oa.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, logprobs=0)
    return out.choices[0].logprobs.token_logprobs


def test_chat_and_completions_in_openai_shapes(server):
    oa = client(server)
    model = base_model(server)
    chat = oa.chat.completions.create(model=model, messages=CHAT, max_tokens=5, n=3, seed=7)
    assert chat.object == "chat.completion" and chat.model == model and chat.id.startswith("chatcmpl-")
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in chat.choices)
    assert len({c.message.content for c in chat.choices}) > 1  # three independent candidates
    assert chat.usage.completion_tokens == 15 and chat.usage.prompt_tokens > 5
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 15

    again = oa.chat.completions.create(model=model, messages=CHAT, max_tokens=5, n=3, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]
    other = oa.chat.completions.create(model=model, messages=CHAT, max_tokens=5, n=3, seed=8)
    assert [c.message.content for c in other.choices] != [c.message.content for c in chat.choices]

    done = oa.completions.create(model=model, prompt=["Once upon", "a time"], max_tokens=3, n=2, seed=1)
    assert done.object == "text_completion" and [c.index for c in done.choices] == [0, 1, 2, 3]
    assert done.usage.completion_tokens == 12

    # max_completion_tokens (the newer name) bounds the reply too.
    short = oa.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=2, seed=1)
    assert short.usage.completion_tokens == 2


def test_logprobs(server):
    oa = client(server)
    model = base_model(server)
    chat = oa.chat.completions.create(model=model, messages=CHAT, max_tokens=4, seed=3, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob < 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and entry.logprob <= values[0] + 1e-5
    assert (
        "".join(bytes(b for e in content for b in e.bytes).decode("utf-8", "replace"))
        == chat.choices[0].message.content
    )

    greedy_run = oa.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    logprobs = greedy_run.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    for _token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy: the most likely token
    assert logprobs.text_offset[0] == 0


def test_streams_arrive_as_tokens_are_decoded(server):
    oa = client(server)
    model = base_model(server)
    whole = oa.chat.completions.create(model=model, messages=CHAT, max_tokens=12, n=2, seed=5)

    chunks = list(
        oa.chat.completions.create(
            model=model, messages=CHAT, max_tokens=12, n=2, seed=5, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert sum(1 for c in mine if c.delta.content) >= 6  # token by token, not one block
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[index].message.content
        assert [c.finish_reason for c in mine][-1] == "length"

    streamed = list(oa.completions.create(model=model, prompt="Hello", max_tokens=6, seed=2, stream=True))
    whole_text = oa.completions.create(model=model, prompt="Hello", max_tokens=6, seed=2).choices[0].text
    assert "".join(c.choices[0].text for c in streamed) == whole_text
    assert streamed[-1].choices[0].finish_reason == "length"

    # The first tokens arrive while the sample is still decoding, not after it.
    body = {"model": model, "messages": CHAT, "max_tokens": 16, "seed": 1, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, timeout=60, headers={"Authorization": "Bearer key-a"}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                assert server.service.runner.unfinished() == [("sample", "running")]
                break
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"


def test_runs_checkpoints_and_snapshots_as_models(server):
    oa = client(server)
    model = base_model(server)
    with ServiceClient(server.url, api_key="key-a", max_retries=0) as sdk:
        run = sdk.create_training_run(lora_rank=4)
        train(run, 3)
        run.save_state("c1").result(timeout=60)

        listed = {m.id: m for m in oa.models.list().data}
        assert listed[model].owned_by == "eztinker"
        assert listed[run.run_id].parent == model and listed[run.run_id].owned_by == "alice"
        assert listed[f"{run.run_id}/c1"].parent == model
        assert oa.models.retrieve(f"{run.run_id}/c1").id == f"{run.run_id}/c1"

        base = greedy(oa, model)
        trained = greedy(oa, run.run_id)
        assert trained != pytest.approx(base, abs=1e-3)  # the adapter, not the bare model
        reply = oa.completions.create(model=run.run_id, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1)
        assert reply.choices[0].logprobs.token_logprobs[0] == pytest.approx(trained[0], abs=1e-4)

        snapshot = greedy(oa, f"{run.run_id}/c1")
        assert snapshot == pytest.approx(trained, abs=1e-4)
        train(run, 2)  # the run moves on; its checkpoint stays
        assert greedy(oa, f"{run.run_id}/c1") == pytest.approx(snapshot, abs=1e-4)
        assert greedy(oa, f"tinker://{run.run_id}/weights/c1") == pytest.approx(snapshot, abs=1e-4)
        assert greedy(oa, run.run_id) != pytest.approx(snapshot, abs=1e-3)

        # Chat on a run: its adapter, through the chat template.
        chat = oa.chat.completions.create(model=run.run_id, messages=CHAT, max_tokens=3, seed=1)
        assert chat.model == run.run_id and chat.usage.completion_tokens == 3

        # Bob sees none of it.
        bob = client(server, "key-b")
        assert [m.id for m in bob.models.list().data] == [model]
        for name in (run.run_id, f"{run.run_id}/c1", f"tinker://{run.run_id}/weights/c1"):
            with pytest.raises(openai.NotFoundError) as caught:
                bob.chat.completions.create(model=name, messages=CHAT, max_tokens=2)
            assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
            with pytest.raises(openai.NotFoundError):
                bob.models.retrieve(name)


def test_errors_in_openai_shape(server):
    oa = client(server)
    model = base_model(server)
    with pytest.raises(openai.NotFoundError) as caught:
        oa.chat.completions.create(model="no-such-model", messages=CHAT)
    assert caught.value.status_code == 404 and caught.value.body["type"] == "invalid_request_error"

    bad = [
        (dict(temperature=5), "temperature"),  # request validation
        (dict(max_tokens=10**6), "max_tokens"),  # the server's limit
        (dict(max_completion_tokens=10**6), "max_completion_tokens"),
        (dict(n=10**4), "n"),
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(seed=-1), "seed"),
        (dict(logprobs=True, top_logprobs=50), "top_logprobs"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ]
    for kwargs, param in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            oa.chat.completions.create(model=model, messages=CHAT, **kwargs)
        assert caught.value.status_code == 400 and caught.value.body["param"] == param, (kwargs, caught.value.body)
        assert caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        oa.chat.completions.create(model=model, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert caught.value.body["param"].startswith("messages")
    with pytest.raises(openai.BadRequestError) as caught:  # echo is supported (test_eval_api.py); suffix is not
        oa.completions.create(model=model, prompt="hi", suffix="there")
    assert caught.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model=model, prompt=[10**7])  # a token outside the vocabulary

    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, "wrong").models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    missing = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "hi"})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").chat.completions.create(model=model, messages=CHAT)


def scrape(server) -> dict:
    response = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer key-b"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_count_jobs_tokens_and_runs(server):
    oa = client(server)
    model = base_model(server)
    before = scrape(server)
    with ServiceClient(server.url, api_key="key-a", max_retries=0) as sdk:
        run = sdk.create_training_run()
        train(run, 2)
    oa.completions.create(model=model, prompt="Hi", max_tokens=3, n=2)
    list(oa.completions.create(model=run.run_id, prompt="Hi", max_tokens=2, stream=True))

    assert httpx.get(server.url + "/metrics").status_code == 401  # keys on: metrics too
    after = scrape(server)

    def value(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - (0 if name in ("eztinker_runs", "eztinker_queue_depth") else before.get(key, 0))

    assert value("eztinker_jobs_finished_total", kind="sample", status="completed") == 2
    assert value("eztinker_jobs_finished_total", kind="forward_backward", status="completed") == 2
    assert value("eztinker_jobs_finished_total", kind="optim_step", status="completed") == 2
    assert value("eztinker_jobs_finished_total", kind="create_run", status="completed") == 1
    assert value("eztinker_job_latency_seconds_count", kind="sample") == 2
    assert value("eztinker_job_run_seconds_count", kind="forward_backward") == 2
    assert value("eztinker_tokens_sampled_total", model=model) == 3 * 2 + 2
    assert value("eztinker_tokens_trained_total", model=model) == 2 * len(EXAMPLE.model_input.tokens)
    live = [r for user in ("alice", "bob") for r in server.service.list_runs(user)]
    assert value("eztinker_runs", base_model=model) == len(live) >= 1
    assert value("eztinker_queue_depth") == 0


def test_stop_strings_cut_whole_and_streamed_text_alike(server):
    oa = client(server)
    model = base_model(server)
    full = oa.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    expected = full[: full.find(stop)]
    whole = oa.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0, stop=[stop]).choices[0]
    assert whole.text == expected and whole.finish_reason == "stop"
    streamed = list(
        oa.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == expected  # nothing past the stop string was sent
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_vllm_sampling_extensions_are_honoured(server):
    """top_k, min_p, repetition_penalty, min_tokens and ignore_eos, as vLLM's server takes them
    (the openai client sends them in extra_body); test_sampler.py checks each against its definition."""
    oa = client(server)
    model = base_model(server)

    def completion(**extra):
        out = oa.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=8,
            temperature=extra.pop("temperature", 0),
            seed=5,
            logprobs=0,
            extra_body=extra,
        )
        return out.choices[0], out.usage.completion_tokens

    greedy_choice, _ = completion()
    greedy = greedy_choice.logprobs.token_logprobs
    sampled = completion(temperature=1.5)[0].logprobs.token_logprobs
    assert sampled != greedy
    assert completion(temperature=1.5, top_k=1)[0].logprobs.token_logprobs == greedy  # only the most likely is left
    assert completion(temperature=1.5, min_p=1.0)[0].logprobs.token_logprobs == greedy
    assert completion(temperature=1.5, top_k=-1)[0].logprobs.token_logprobs == sampled  # vLLM's "off"
    penalised = completion(repetition_penalty=2.0)[0].logprobs.tokens
    assert len(set(greedy_choice.logprobs.tokens)) < 3 < len(set(penalised))  # the tiny model's loop is broken
    # min_tokens: no stop before it, a stop string included (the greedy reply's first piece).
    first = greedy_choice.logprobs.tokens[0]
    assert first and completion(stop=[first])[1] == 1
    assert completion(stop=[first], min_tokens=5)[1] >= 5

    # ignore_eos: a run trained to end its reply at once.
    eos = sorted(server.service.models[model].stop_token_ids)[0]
    with ServiceClient(server.url, api_key="key-a", max_retries=0) as sdk:
        run = sdk.create_training_run(lora_rank=4, seed=3)
        for _ in range(12):
            run.forward_backward([datum_from_tokens(PROMPT, [eos])])
            run.optim_step(AdamParams(learning_rate=5e-2))
        run.save_state("ends-at-once").result(timeout=120)
    ends = oa.completions.create(model=run.run_id, prompt=PROMPT, max_tokens=6, temperature=0)
    assert ends.choices[0].finish_reason == "stop" and ends.usage.completion_tokens == 1
    goes_on = oa.completions.create(
        model=run.run_id, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert goes_on.choices[0].finish_reason == "length" and goes_on.usage.completion_tokens == 6
    held = oa.completions.create(
        model=run.run_id, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"min_tokens": 3}
    )
    assert held.usage.completion_tokens >= 3


def test_parameters_this_server_cannot_honour_are_refused_by_name(server):
    oa = client(server)
    model = base_model(server)
    refused = [
        (dict(extra_body={"best_of": 3}), "best_of"),
        (dict(modalities=["text", "audio"]), "modalities"),
        (dict(audio={"voice": "alloy", "format": "wav"}), "audio"),
        (dict(prediction={"type": "content", "content": "x"}), "prediction"),
        (dict(reasoning_effort="low"), "reasoning_effort"),
        (dict(web_search_options={}), "web_search_options"),
        (dict(max_tokens=4, extra_body={"min_tokens": 5}), "min_tokens"),
        (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
        (dict(extra_body={"min_p": 1.5}), "min_p"),
        (dict(extra_body={"top_k": -2}), "top_k"),
    ]
    for kwargs, param in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            oa.chat.completions.create(model=model, messages=CHAT, **kwargs)
        body = caught.value.body
        assert caught.value.status_code == 400 and body["param"] == param, (kwargs, body)
        assert body["type"] == "invalid_request_error" and param in body["message"], body
    # Their neutral values are what the server does anyway.
    neutral = oa.chat.completions.create(
        model=model, messages=CHAT, max_tokens=2, n=2, modalities=["text"], extra_body={"best_of": 2}
    )
    assert len(neutral.choices) == 2


def test_an_abandoned_sample_stops_decoding_and_does_not_hold_up_the_next_request(server):
    """A stream whose client disconnects, and a whole answer whose client timed out, stop at the
    next decode step: an 8-token chat sent right after is not queued behind their 64 x 1024 tokens."""
    import time

    oa = client(server)
    model = base_model(server)
    long = {"model": model, "messages": CHAT, "n": 64, "max_tokens": 1024, "ignore_eos": True}
    headers = {"Authorization": "Bearer key-a"}

    def abandoned() -> tuple[float, float]:
        found = scrape(server)
        return (
            found.get(("eztinker_samples_abandoned_total", (("model", model),)), 0),
            found.get(("eztinker_tokens_sampled_total", (("model", model),)), 0),
        )

    def after_abandoning(count_before: float) -> None:
        deadline = time.monotonic() + 60
        while abandoned()[0] < count_before + 1:
            assert time.monotonic() < deadline, "the abandoned sample was never cancelled"
            time.sleep(0.05)

    # A stream: read until tokens flow, then hang up.
    count, tokens = abandoned()
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST", server.url + "/v1/chat/completions", headers=headers, json={**long, "stream": True}
        ) as response:
            chunks = 0
            for line in response.iter_lines():
                chunks += line.startswith("data: ") and '"content":"' in line and '"content":""' not in line
                if chunks >= 8:
                    break
    started = time.monotonic()
    chat = oa.chat.completions.create(model=model, messages=CHAT, max_tokens=8, extra_body={"ignore_eos": True})
    waited = time.monotonic() - started
    after_abandoning(count)
    count_after, tokens_after = abandoned()
    decoded = tokens_after - tokens - chat.usage.completion_tokens
    assert chat.usage.completion_tokens == 8
    assert decoded < 64 * 1024 / 4, decoded  # it stopped soon after its client left (all 65,536 before)
    assert waited < 10, waited

    # A whole answer whose client gives up waiting.
    count, tokens = count_after, tokens_after
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", headers=headers, json=long, timeout=1.0)
    started = time.monotonic()
    chat = oa.chat.completions.create(model=model, messages=CHAT, max_tokens=8, extra_body={"ignore_eos": True})
    waited = time.monotonic() - started
    after_abandoning(count)
    decoded = abandoned()[1] - tokens - chat.usage.completion_tokens
    assert decoded < 64 * 1024 / 4, decoded
    assert waited < 10, waited
