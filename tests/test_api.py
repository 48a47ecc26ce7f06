"""The HTTP API as a user meets it: the real app served by uvicorn, driven by the real SDK
(and by raw httpx where the exact response matters). No mocks."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import socket
import statistics
import time

import httpx
import pytest
from support import EXAMPLE, FAST, PROMPT, REPLY, score, slow_batch, train
from support import TINY_VOCAB as VOCAB  # checked against /v1/info below

from eztinker import (
    APIFuture,
    APIStatusError,
    CheckpointInfo,
    ConnectionFailedError,
    Datum,
    ForwardBackwardResult,
    JobFailedError,
    LossFnInputs,
    ModelInput,
    OptimStepResult,
    SamplingParams,
    ServiceClient,
    TrainingClient,
    datum_from_messages,
    datum_from_tokens,
)
from eztinker.chat import render_prompt
from eztinker.server.settings import ServerSettings


# ------------------------------------------------------------------------------- helpers
@pytest.fixture()
def server(make_server):
    with make_server() as running:
        yield running


@pytest.fixture()
def client(server):
    with ServiceClient(server.url, max_retries=0) as service:
        yield service


def as_json(datum: Datum) -> dict:
    return json.loads(datum.model_dump_json())


def strict_json(response: httpx.Response):
    """The body parsed as standard JSON (NaN/Infinity are not JSON and fail here)."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant} in the response")

    return json.loads(response.text, parse_constant=refuse)


def assert_422(response: httpx.Response, loc: tuple | None = None, mentions: tuple[str, ...] = ()) -> list:
    """A 422 whose detail has an error at `loc` (prefix match) and names each of `mentions`."""
    assert response.status_code == 422, response.text
    detail = strict_json(response)["detail"]
    assert isinstance(detail, list) and detail, detail
    if loc is not None:
        locs = [tuple(item["loc"]) for item in detail]
        assert any(found[: len(loc)] == loc for found in locs), (loc, locs)
    for name in mentions:
        assert name in response.text, (name, response.text)
    return detail


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ round trip
def test_sdk_round_trip(client, tmp_path):
    assert client.health().status == "ok"
    assert client.info()["vocab_size"] == VOCAB

    run = client.create_training_run(lora_rank=2, seed=1)
    info = run.info()
    assert (info.step, info.lora.rank, info.checkpoints, info.restored_from) == (0, 2, [], None)

    # Pipelined: ten jobs queued before the first result is read; they run in order.
    futures = []
    for _ in range(5):
        futures += [run.forward_backward([EXAMPLE]), run.optim_step(FAST)]
    assert len({f.job_id for f in futures}) == 10
    results = [f.result(timeout=60) for f in futures]
    losses = [r.loss for r in results[0::2]]
    assert [r.step for r in results[1::2]] == [1, 2, 3, 4, 5]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.5, losses

    first = results[0]
    assert first.num_tokens == len(REPLY)
    row = first.logprobs[0]
    assert len(row) == len(PROMPT) + len(REPLY) - 1
    assert row[: len(PROMPT) - 1] == [None] * (len(PROMPT) - 1)  # weight 0: never computed
    assert all(lp is not None and lp < 0 for lp in row[len(PROMPT) - 1 :])
    assert first.loss == pytest.approx(-sum(row[len(PROMPT) - 1 :]), rel=1e-4)
    assert run.info().step == 5

    # Sampling: N candidates per prompt, for text, token and chat prompts.
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    prompts = ["Hello there", PROMPT, [{"role": "user", "content": "Hi!"}]]
    sampled = run.sample(prompts, num_samples=3, sampling_params=params).result(timeout=60)
    assert len(sampled.prompt_tokens) == len(sampled.sequences) == 3
    assert sampled.prompt_tokens[1] == PROMPT
    for candidates in sampled.sequences:
        assert len(candidates) == 3
        for seq in candidates:
            assert isinstance(seq.text, str)
            assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs) == len(seq.tokens)
            assert all(math.isfinite(lp) and lp <= 0 for lp in seq.logprobs)
            assert seq.stop_reason in ("stop", "length")
            if seq.stop_reason == "length":
                assert len(seq.tokens) == 6
    again = run.sample(prompts, num_samples=3, sampling_params=params).result(timeout=60)
    assert [[s.tokens for s in c] for c in again.sequences] == [[s.tokens for s in c] for c in sampled.sequences]

    # The server's tokenizer, fetched by the SDK, agrees with the server's own encoding, and
    # chat examples built with it train.
    tokenizer = client.get_tokenizer(cache_dir=tmp_path / "tokenizers")
    assert sampled.prompt_tokens[0] == tokenizer.encode("Hello there", add_special_tokens=False)
    assert sampled.prompt_tokens[2] == render_prompt(tokenizer, prompts[2])
    chat = datum_from_messages(tokenizer, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    assert run.forward_backward([chat]).result(timeout=60).num_tokens >= 2

    # Scoring (evaluate).
    scores = run.score(PROMPT, ["hello", "hello world"]).result(timeout=60).scores
    assert len(scores) == 2
    for s in scores:
        assert s.num_tokens >= 1 and s.sum_logprob < 0
        assert s.mean_logprob == pytest.approx(s.sum_logprob / s.num_tokens)
    assert scores[1].num_tokens > scores[0].num_tokens

    # save_state / load_state: back to the checkpoint's adapter and step.
    at_save = score(run)
    checkpoint = run.save_state("c5").result(timeout=60)
    assert (checkpoint.run_id, checkpoint.name, checkpoint.step) == (run.run_id, "c5", 5)
    assert train(run, 2) == [6, 7]
    assert score(run) != pytest.approx(at_save, rel=1e-6)
    loaded = run.load_state("c5").result(timeout=60)
    assert loaded == {"step": 5, "restored_from": f"{run.run_id}/c5"}
    info = run.info()
    assert (info.step, info.restored_from) == (5, f"{run.run_id}/c5")
    assert [(c.name, c.step) for c in info.checkpoints] == [("c5", 5)]
    assert score(run) == pytest.approx(at_save, rel=1e-5)
    assert train(run, 1) == [6]

    # A new run can start from a checkpoint: same adapter, same step.
    copy = client.create_training_run(lora_rank=2, from_checkpoint=f"{run.run_id}/c5")
    assert (copy.info().step, copy.info().restored_from) == (5, f"{run.run_id}/c5")
    assert score(copy) == pytest.approx(at_save, rel=1e-5)

    # Futures are awaitable.
    async def both():
        return await asyncio.gather(copy.forward_backward([EXAMPLE]), copy.optim_step(FAST))

    fb, opt = asyncio.run(both())
    assert fb.num_tokens == len(REPLY) and opt.step == 6

    # Base-model sampling; a fresh adapter (lora_B = 0) samples exactly like the base model.
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    base = client.sample([PROMPT], num_samples=2, sampling_params=greedy).result(timeout=60)
    assert len(base.sequences) == 1 and len(base.sequences[0]) == 2
    assert base.sequences[0][0].tokens == base.sequences[0][1].tokens  # greedy
    fresh = client.create_training_run(lora_rank=2)
    same = fresh.sample([PROMPT], sampling_params=greedy).result(timeout=60)
    assert same.sequences[0][0].tokens == base.sequences[0][0].tokens

    # list / get / delete.
    assert [r.id for r in client.list_runs()] == [run.run_id, copy.run_id, fresh.run_id]
    assert client.training_client(copy.run_id).info().id == copy.run_id
    assert client.health().runs == 3
    fresh.delete()
    run.delete()
    assert [r.id for r in client.list_runs()] == [copy.run_id]
    for gone in (fresh, run):
        with pytest.raises(APIStatusError) as err:
            gone.info()
        assert err.value.status_code == 404
        with pytest.raises(APIStatusError) as err:
            gone.forward_backward([EXAMPLE])
        assert err.value.status_code == 404
    # A deleted run's checkpoints go with it; the run created from one keeps what it loaded.
    with pytest.raises(APIStatusError) as err:
        copy.load_state(f"{run.run_id}/c5").result(timeout=60)
    assert err.value.status_code == 404
    assert copy.info().restored_from == f"{run.run_id}/c5"


# --------------------------------------------------------------------------------- restart
def test_restart_restores_runs_checkpoints_and_jobs(make_server, tmp_path):
    data_dir = tmp_path / "restart"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url) as service:
        run = service.create_training_run(lora_rank=2)
        train(run, 2)
        save = run.save_state("c1")
        checkpoint = save.result(timeout=60)
        at_checkpoint = score(run)
        later_step = run.optim_step(FAST)  # step 3: after the checkpoint, so lost on restart
        run.forward_backward([EXAMPLE]).result(timeout=60)
        assert later_step.result(timeout=60).step == 3
        # A job the last server was running when it died (e.g. a crash).
        server.service.store.add_job("job_crashedmidway", "default", run.run_id, "forward_backward")
        server.service.store.mark_started("job_crashedmidway")
        # A slow job and one queued behind it: shutdown lets the running one finish but
        # never starts the queued one.
        slow = run.forward_backward(slow_batch(2000))
        queued = run.optim_step(FAST)
        deadline = time.monotonic() + 30
        while service.job(slow.job_id).status.value == "pending" and time.monotonic() < deadline:
            time.sleep(0.01)

    with make_server(data_dir=data_dir) as server, ServiceClient(server.url) as service:
        [info] = service.list_runs()
        assert info.id == run.run_id
        assert [(c.name, c.step) for c in info.checkpoints] == [("c1", 2)]
        assert info.step == 2
        assert info.restored_from == f"{run.run_id}/c1"

        # Finished jobs are still answerable, results intact.
        saved = service.job(save.job_id)
        assert saved.status.value == "completed"
        assert CheckpointInfo.model_validate(saved.result) == checkpoint
        assert OptimStepResult.model_validate(service.job(later_step.job_id).result).step == 3
        assert service.job(slow.job_id).status.value == "completed"

        # Jobs that could not finish are failed, saying why.
        for job_id in (queued.job_id, "job_crashedmidway"):
            job = service.job(job_id)
            assert job.status.value == "failed" and "interrupted" in job.error, job
        with pytest.raises(JobFailedError, match="interrupted"):
            APIFuture(service, queued.job_id, OptimStepResult.model_validate).result(timeout=10)

        # The adapter is the checkpoint's, and training continues from its step.
        restored = service.training_client(run.run_id)
        assert score(restored) == pytest.approx(at_checkpoint, rel=1e-5)
        assert train(restored, 2) == [3, 4]
        assert restored.info().step == 4
        assert restored.save_state("c2").result(timeout=60).step == 4


def test_restart_restores_the_last_saved_or_loaded_state(make_server, tmp_path):
    """Not merely the newest own checkpoint: a later load (of an older or another run's
    checkpoint) is what the run comes back as."""
    data_dir = tmp_path / "restart-load"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url) as service:
        run = service.create_training_run()
        train(run, 1)
        run.save_state("c1").result(timeout=60)
        at_c1 = score(run)
        train(run, 1)
        run.save_state("c2").result(timeout=60)
        run.load_state("c1").result(timeout=60)  # back to step 1, after saving c2
        other = service.create_training_run()
        other.load_state(f"{run.run_id}/c2").result(timeout=60)  # never saves its own
        at_c2 = score(other)

    with make_server(data_dir=data_dir) as server, ServiceClient(server.url) as service:
        restored, restored_other = (service.training_client(r.run_id) for r in (run, other))
        assert (restored.info().step, restored.info().restored_from) == (1, f"{run.run_id}/c1")
        assert score(restored) == pytest.approx(at_c1, rel=1e-5)
        assert (restored_other.info().step, restored_other.info().restored_from) == (2, f"{run.run_id}/c2")
        assert score(restored_other) == pytest.approx(at_c2, rel=1e-5)


def test_one_service_per_data_directory_until_it_closes(make_server, tmp_path):
    from eztinker.server.datadir import DataDirError

    data_dir = tmp_path / "shared"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url) as service:
        run = service.create_training_run()
        in_use = f"data directory {data_dir.resolve()} is in use by another EZTinker server (pid {os.getpid()})"
        with pytest.raises(DataDirError, match=re.escape(in_use)):
            make_server(data_dir=data_dir)
        assert train(run, 1) == [1]  # the first one is untouched
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url) as service:
        assert [r.id for r in service.list_runs()] == [run.run_id]


def test_create_run_retry_with_the_same_key_returns_the_same_run(server, client):
    body = {"lora": {"rank": 2}, "seed": 1}
    first = httpx.post(f"{server.url}/v1/runs", json=body, headers={"Idempotency-Key": "create-1"})
    again = httpx.post(f"{server.url}/v1/runs", json=body, headers={"Idempotency-Key": "create-1"})
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert len(client.list_runs()) == 1
    conflict = httpx.post(f"{server.url}/v1/runs", json={"seed": 2}, headers={"Idempotency-Key": "create-1"})
    assert conflict.status_code == 409


# ------------------------------------------------------------------------------ liveness
def test_health_and_job_status_answer_while_a_long_job_runs(server, client):
    run = client.create_training_run()
    # A backlog of work several seconds long, so the probes below all land while it runs,
    # however fast the machine.
    backlog = [run.forward_backward(slow_batch(600)) for _ in range(12)]
    last = backlog[-1]
    with pytest.raises(TimeoutError):
        last.result(timeout=0.05)
    health, status = [], []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for _ in range(15):
            started = time.monotonic()
            response = http.get("/health")
            health.append(time.monotonic() - started)
            assert response.status_code == 200 and response.json()["status"] == "ok"
            started = time.monotonic()
            job = http.get(f"/v1/jobs/{last.job_id}")
            status.append(time.monotonic() - started)
            assert job.status_code == 200
            time.sleep(0.02)
        assert job.json()["status"] in ("pending", "running"), "the backlog ended before the probes did"
    assert last.result(timeout=120).num_tokens == 600
    # A finished job's result is there without waiting, even for a fresh future.
    again = APIFuture(client, last.job_id, ForwardBackwardResult.model_validate)
    assert again.result(timeout=0).num_tokens == 600 and again.done()
    for latencies in (health, status):
        assert statistics.median(latencies) < 0.1, latencies
        assert max(latencies) < 0.3, latencies


# ----------------------------------------------------------------------------- bad input
def test_large_results_are_gzipped_for_clients_that_ask(server, client):
    run = client.create_training_run()
    sampling = run.sample([PROMPT] * 8, num_samples=8, sampling_params=SamplingParams(max_tokens=32, seed=0))
    sampling.result(timeout=60)
    url = f"{server.url}/v1/jobs/{sampling.job_id}"
    plain = httpx.get(url, headers={"Accept-Encoding": "identity"})
    packed = httpx.get(url, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    assert packed.headers["content-encoding"] == "gzip"
    assert packed.json() == plain.json()
    assert packed.num_bytes_downloaded < plain.num_bytes_downloaded / 1.5
    # Small answers stay plain; the SDK asks for gzip only across a network.
    assert "content-encoding" not in httpx.get(f"{server.url}/health", headers={"Accept-Encoding": "gzip"}).headers
    assert client._http.headers["accept-encoding"] == "identity"
    for url, wanted in [
        ("http://localhost:1", "identity"),
        ("http://[::1]:1", "identity"),
        ("http://10.1.2.3:1", "gzip"),
        ("https://tinker.example.com", "gzip"),
    ]:
        with ServiceClient(url) as remote:
            assert remote._http.headers["accept-encoding"] == wanted, url


def test_unknown_run_and_job_are_404(server, client):
    for method, path, body in [
        ("GET", "/v1/runs/run_missing", None),
        ("DELETE", "/v1/runs/run_missing", None),
        ("POST", "/v1/runs/run_missing/forward_backward", {"data": [as_json(EXAMPLE)]}),
        ("POST", "/v1/runs/run_missing/optim_step", {}),
        ("POST", "/v1/runs/run_missing/sample", {"prompts": [{"text": "hi"}]}),
        ("POST", "/v1/runs/run_missing/save", {"name": "c"}),
        ("GET", "/v1/jobs/job_missing", None),
    ]:
        response = httpx.request(method, server.url + path, json=body)
        assert response.status_code == 404, (path, response.text)
        assert "missing" in response.json()["detail"]
    with pytest.raises(APIStatusError) as err:
        client.training_client("run_missing")
    assert err.value.status_code == 404 and "run_missing" in str(err.value)
    with pytest.raises(APIStatusError) as err:
        client.job("job_missing")
    assert err.value.status_code == 404


BAD_LORA = {
    "rank-zero": ({"rank": 0}, ("body", "lora", "rank")),
    "rank-negative": ({"rank": -2}, ("body", "lora", "rank")),
    "rank-huge": ({"rank": 100_000}, ("body", "lora", "rank")),
    "alpha-zero": ({"alpha": 0}, ("body", "lora", "alpha")),
    "no-target-modules": ({"target_modules": []}, ("body", "lora", "target_modules")),
    "unknown-field": ({"rnak": 2}, ("body", "lora", "rnak")),
}


def test_bad_lora_config_is_422_naming_the_field(server):
    for case, (lora, loc) in BAD_LORA.items():
        response = httpx.post(f"{server.url}/v1/runs", json={"lora": lora})
        assert response.status_code == 422, case
        assert_422(response, loc)
    assert httpx.get(f"{server.url}/v1/runs").json() == []


def test_non_finite_numbers_are_rejected_not_stored(server, client):
    """Python's json writes NaN/Infinity; each must be a clean 422 (never a 500, never stored)."""
    headers = {"Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/runs", content='{"lora": {"alpha": Infinity}}', headers=headers)
    assert_422(response, ("body", "lora", "alpha"))
    assert client.list_runs() == []  # an infinite alpha used to be stored as null: 500 forever

    run = client.create_training_run()
    datum = as_json(EXAMPLE)
    for field, value in [("weights", "NaN"), ("weights", "Infinity"), ("weights", "-Infinity")]:
        raw = json.dumps({"data": [datum]}).replace('"weights": [0.0, 0.0', f'"weights": [{value}, 0.0')
        assert value in raw
        response = httpx.post(f"{server.url}/v1/runs/{run.run_id}/forward_backward", content=raw, headers=headers)
        assert_422(response, ("body", "data", 0, "loss_fn_inputs", field))
    n = len(datum["model_input"]["tokens"])
    is_datum = {
        **datum,
        "loss_fn_inputs": {
            **datum["loss_fn_inputs"],
            "weights": None,
            "logprobs": [-1.0] * n,
            "advantages": [float("nan")] * n,
        },
    }
    raw = json.dumps({"data": [is_datum], "loss_fn": "importance_sampling"})
    response = httpx.post(f"{server.url}/v1/runs/{run.run_id}/forward_backward", content=raw, headers=headers)
    assert_422(response, ("body", "data", 0, "loss_fn_inputs", "advantages"))

    for adam in (
        '{"learning_rate": NaN}',
        '{"eps": Infinity}',
        '{"weight_decay": Infinity}',
        '{"grad_clip_norm": NaN}',
    ):
        response = httpx.post(
            f"{server.url}/v1/runs/{run.run_id}/optim_step", content=f'{{"adam_params": {adam}}}', headers=headers
        )
        field = adam.split('"')[1]
        assert_422(response, ("body", "adam_params", field))
    response = httpx.post(
        f"{server.url}/v1/runs/{run.run_id}/sample",
        content='{"prompts": [{"text": "hi"}], "sampling_params": {"temperature": NaN}}',
        headers=headers,
    )
    assert_422(response, ("body", "sampling_params", "temperature"))
    assert run.info().step == 0
    assert train(run, 1) == [1]  # and the run is fine


def _fb(tokens=None, targets=None, **changes) -> dict:
    datum = as_json(EXAMPLE)
    if tokens is not None:
        datum["model_input"]["tokens"] = tokens
    if targets is not None:
        datum["loss_fn_inputs"]["target_tokens"] = targets
    return {"data": [datum], **changes}


N_TOKENS = len(PROMPT) + len(REPLY) - 1


DATUM_JSON = as_json(EXAMPLE)
BAD_FORWARD_BACKWARD = {  # case: (body, loc the error must have, words the detail must contain)
    "empty-data": ({"data": []}, ("body", "data"), ()),
    "no-data": ({}, ("body", "data"), ()),
    "token-above-vocab": (
        _fb(tokens=[1, VOCAB] + [1] * (N_TOKENS - 2)),
        ("body", "data", 0, "model_input", "tokens", 1),
        ("vocabulary",),
    ),
    "negative-token": (_fb(tokens=[-1] + [1] * (N_TOKENS - 1)), ("body", "data", 0, "model_input", "tokens", 0), ()),
    "target-above-vocab": (
        _fb(targets=[1, 1, 10**12] + [1] * (N_TOKENS - 3)),
        ("body", "data", 0, "loss_fn_inputs", "target_tokens", 2),
        (),
    ),
    "misaligned": (_fb(targets=[1, 2]), ("body", "data", 0), ("target_tokens",)),
    "unknown-loss-fn": (_fb(loss_fn="mse"), ("body", "loss_fn"), ()),
    "loss-fn-missing-inputs": (_fb(loss_fn="importance_sampling"), ("body",), ("advantages",)),
    "unknown-field": (_fb(bogus_option=1), ("body", "bogus_option"), ()),
    "unknown-datum-field": ({"data": [{**DATUM_JSON, "extra_field": 1}]}, ("body", "data", 0, "extra_field"), ()),
    "unknown-nested-field": (
        {"data": [{**DATUM_JSON, "loss_fn_inputs": {**DATUM_JSON["loss_fn_inputs"], "weight": 1}}]},
        ("body", "data", 0, "loss_fn_inputs", "weight"),
        (),
    ),
}


def test_bad_forward_backward_is_422_naming_the_field(server, client):
    run = client.create_training_run()
    for case, (body, loc, mentions) in BAD_FORWARD_BACKWARD.items():
        response = httpx.post(f"{server.url}/v1/runs/{run.run_id}/forward_backward", json=body)
        assert response.status_code == 422, (case, response.text)
        assert_422(response, loc, mentions)
    assert run.info().step == 0


def test_bad_input_through_the_sdk(client):
    run = client.create_training_run()
    bad = Datum(model_input=ModelInput(tokens=[5, VOCAB + 7]), loss_fn_inputs=LossFnInputs(target_tokens=[6, 7]))
    with pytest.raises(APIStatusError) as err:
        run.forward_backward([bad])
    assert err.value.status_code == 422
    assert "data.0.model_input.tokens.1" in str(err.value) and str(VOCAB + 7) in str(err.value)
    # What the SDK's own models can check, it refuses before sending.
    with pytest.raises(ValueError, match="loss_fn"):
        run.forward_backward([EXAMPLE], loss_fn="mse")
    with pytest.raises(ValueError, match="rank"):
        client.create_training_run(lora_rank=0)
    with pytest.raises(APIStatusError) as err:
        client.sample(["hi"], sampling_params=SamplingParams(max_tokens=1025))
    assert err.value.status_code == 422
    assert "sampling_params.max_tokens" in str(err.value) and "1024" in str(err.value)


ONE_PROMPT = [{"tokens": [1, 2]}]
BAD_SAMPLE = {  # case: (body, loc the error must have)
    "max-tokens-over-limit": (
        {"prompts": ONE_PROMPT, "sampling_params": {"max_tokens": 5000}},
        ("body", "sampling_params", "max_tokens"),
    ),
    "max-tokens-zero": (
        {"prompts": ONE_PROMPT, "sampling_params": {"max_tokens": 0}},
        ("body", "sampling_params", "max_tokens"),
    ),
    "no-samples": ({"prompts": ONE_PROMPT, "num_samples": 0}, ("body", "num_samples")),
    "too-many-samples": ({"prompts": ONE_PROMPT, "num_samples": 5000}, ("body", "num_samples")),
    "no-prompts": ({"prompts": []}, ("body", "prompts")),
    "prompt-token-above-vocab": ({"prompts": [{"tokens": [1, VOCAB]}]}, ("body", "prompts", 0, "tokens", 1)),
    "two-prompt-kinds": ({"prompts": [{"tokens": [1], "text": "hi"}]}, ("body", "prompts", 0)),
    "unknown-param": (
        {"prompts": ONE_PROMPT, "sampling_params": {"temprature": 0.5}},
        ("body", "sampling_params", "temprature"),
    ),
    "empty-stop": ({"prompts": ONE_PROMPT, "sampling_params": {"stop": [""]}}, ("body", "sampling_params", "stop")),
}


def test_bad_sample_is_422_naming_the_field(server, client):
    run = client.create_training_run()
    for case, (body, loc) in BAD_SAMPLE.items():
        for path in (f"/v1/runs/{run.run_id}/sample", "/v1/sample"):
            response = httpx.post(server.url + path, json=body)
            assert response.status_code == 422, (case, path, response.text)
            assert_422(response, loc)


def test_checkpoint_names_and_references_are_checked(server, client):
    run = client.create_training_run()
    url = f"{server.url}/v1/runs/{run.run_id}"
    for name in ["a/b", "..", "a..b", "../evil", "/abs", "", ".hidden", "x" * 200, "sp ace"]:
        assert_422(httpx.post(f"{url}/save", json={"name": name}), ("body", "name"))
    for ref in ["../../etc/passwd", "a/b/c", "/abs", "x/../y", "run_x/..", "../c1", "a..b", ""]:
        assert_422(httpx.post(f"{url}/load", json={"checkpoint": ref}), ("body", "checkpoint"))
    assert_422(httpx.post(f"{server.url}/v1/runs", json={"from_checkpoint": "../../etc"}), ("body", "from_checkpoint"))
    assert list((server.service.checkpoint_root.parent).glob("**/evil*")) == []

    # Well-formed references to checkpoints that do not exist: 404.
    for ref in ["nope", f"{run.run_id}/nope", "run_doesnotexist/c1"]:
        response = httpx.post(f"{url}/load", json={"checkpoint": ref})
        assert response.status_code == 404 and "not found" in response.json()["detail"], response.text
    with pytest.raises(APIStatusError) as err:
        run.load_state("nope")
    assert err.value.status_code == 404 and "nope" in str(err.value)
    with pytest.raises(APIStatusError) as err:
        client.create_training_run(from_checkpoint=f"{run.run_id}/nope")
    assert err.value.status_code == 404
    assert len(client.list_runs()) == 1


def test_misc_malformed_requests(server, client):
    run = client.create_training_run()
    url = f"{server.url}/v1/runs/{run.run_id}"
    response = httpx.post(f"{url}/forward_backward", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    response = httpx.post(f"{url}/optim_step", json={"adam_params": {"learning_rate": 0}})
    assert_422(response, ("body", "adam_params", "learning_rate"))
    response = httpx.post(f"{url}/optim_step", json={}, headers={"Idempotency-Key": "k" * 500})
    assert_422(response, ("header", "Idempotency-Key"))
    response = httpx.get(f"{server.url}/v1/jobs/job_x", params={"wait": -1})
    assert_422(response, ("query", "wait"))
    response = httpx.post(f"{server.url}/v1/runs", json={"base_model": "some/other-model"})
    assert_422(response, ("body", "base_model"))
    response = httpx.post(f"{url}/evaluate", json={"prompt": {"text": "hi"}, "responses": []})
    assert_422(response, ("body", "responses"))


def test_every_job_is_bounded_up_front_by_a_named_limit(make_server):
    """evaluate had no limit at all (256 responses x 512 tokens took 95 s and +700 MB); a sample
    inside every other limit drove the server to 4.1 GB. Each is now refused with a 422 naming
    the limit, before any job is queued."""
    with (
        make_server(max_batch_examples=4, max_tokens_per_request=64) as server,
        ServiceClient(server.url, max_retries=0) as client,
    ):
        run = client.create_training_run()
        assert client.info()["limits"]["max_tokens_per_request"] == 64
        url = f"{server.url}/v1/runs/{run.run_id}"
        prompt = {"tokens": [100, 200, 300]}
        too_many = httpx.post(f"{url}/evaluate", json={"prompt": prompt, "responses": ["a"] * 5})
        assert_422(too_many, ("body", "responses"), mentions=("5 responses", "max_batch_examples (4)"))
        too_long = httpx.post(f"{url}/evaluate", json={"prompt": prompt, "responses": ["hello " * 40] * 2})
        assert_422(too_long, ("body", "responses"), mentions=("max_tokens_per_request (64)",))
        sample = {"prompts": [prompt] * 2, "num_samples": 2, "sampling_params": {"max_tokens": 14}}
        too_wide = httpx.post(f"{url}/sample", json=sample)  # (3 + 14) x 2 x 2 = 68 tokens of KV cache
        assert_422(too_wide, ("body", "num_samples"), mentions=("= 68 tokens", "max_tokens_per_request (64)"))
        long = datum_from_tokens(list(range(10, 30)), list(range(30, 50)))  # 39 tokens each
        fb = httpx.post(f"{url}/forward_backward", json={"data": [as_json(long)] * 2})
        assert_422(fb, ("body", "data"), mentions=("= 78 tokens", "max_tokens_per_request (64)"))
        assert client.health().queued_jobs == 0
        # Within the limits all of them run.
        assert len(run.score([100, 200, 300], ["a", "b", "c", "d"]).result(timeout=60).scores) == 4
        sample["sampling_params"]["max_tokens"] = 13
        assert httpx.post(f"{url}/sample", json=sample).status_code == 202
        assert run.forward_backward([long]).result(timeout=60).num_tokens > 0


def test_slow_clients_are_dropped_while_others_are_served(make_server):
    """Connections sending partial headers, or headers and half a body, used to stay open forever
    (300 of them held 310 file descriptors after 75 s). Each now has a deadline; and at most
    max_connections are served at once."""
    with make_server(header_timeout_seconds=1, body_timeout_seconds=1, max_connections=4) as server:
        address = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))

        def connect(first: bytes) -> socket.socket:
            sock = socket.create_connection(address, timeout=5)
            sock.sendall(first)
            return sock

        opened = time.monotonic()
        slowloris = connect(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # a Host of this machine
        no_body = connect(
            b"POST /v1/runs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        silent = connect(b"")
        with httpx.Client(base_url=server.url) as other:
            while time.monotonic() - opened < 0.7:  # the slowloris keeps sending; another client is served
                slowloris.sendall(b"X-Slow: 1\r\n")
                assert other.get("/health").status_code == 200
                time.sleep(0.1)
            assert httpx.get(f"{server.url}/health").status_code == 503  # a fifth connection: over the limit
            for name, sock in (("slowloris", slowloris), ("no body", no_body), ("silent", silent)):
                reply = b""
                while chunk := sock.recv(4096):
                    reply += chunk
                assert 0.9 < time.monotonic() - opened < 3, name
                assert reply.startswith(b"HTTP/1.1 408 Request Timeout"), (name, reply)
                sock.close()
            assert httpx.get(f"{server.url}/health").status_code == 200  # room again
            assert other.get("/health").status_code == 200


def test_request_body_over_the_limit_is_413(make_server):
    with make_server(max_request_bytes=4096) as server, ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run()
        url = f"{server.url}/v1/runs/{run.run_id}/forward_backward"
        big = {"data": [as_json(EXAMPLE)] * 60}
        assert len(json.dumps(big)) > 4096
        response = httpx.post(url, json=big)
        assert response.status_code == 413 and "max_request_bytes" in response.json()["detail"]

        # Without a Content-Length (chunked upload) the limit holds as well.
        payload = json.dumps(big).encode()

        def chunks():
            for start in range(0, len(payload), 1000):
                yield payload[start : start + 1000]

        response = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413, response.text
        small = json.dumps({"data": [as_json(EXAMPLE)]}).encode()
        response = httpx.post(url, content=iter([small[:50], small[50:]]), headers={"Content-Type": "application/json"})
        assert response.status_code == 202, response.text

        with pytest.raises(APIStatusError) as err:
            run.forward_backward([EXAMPLE] * 60)
        assert err.value.status_code == 413
        assert train(run, 1) == [1]  # smaller requests still work


# ----------------------------------------------------------------------- failing jobs
def test_failed_job_reports_its_error_and_the_server_keeps_serving(client):
    run = client.create_training_run(lora_rank=2)
    n = len(PROMPT) + len(REPLY) - 1
    tokens = (PROMPT + REPLY)[:-1]
    # The sampler's logprobs far below the model's make the importance ratio overflow.
    blowup = Datum(
        model_input=ModelInput(tokens=tokens),
        loss_fn_inputs=LossFnInputs(target_tokens=(PROMPT + REPLY)[1:], logprobs=[-1000.0] * n, advantages=[1.0] * n),
    )
    failing = run.forward_backward([blowup], loss_fn="importance_sampling")
    with pytest.raises(JobFailedError) as err:
        failing.result(timeout=60)
    assert err.value.job_id == failing.job_id and err.value.kind == "forward_backward"
    assert "not finite" in err.value.error and "not finite" in str(err.value)
    job = client.job(failing.job_id)
    assert job.status.value == "failed" and "not finite" in job.error and job.result is None

    # A checkpoint of another LoRA rank cannot be loaded.
    other = client.create_training_run(lora_rank=4)
    other.save_state("rank4").result(timeout=60)
    with pytest.raises(JobFailedError, match="does not match"):
        run.load_state(f"{other.run_id}/rank4").result(timeout=60)

    # The server and the run are fine: the next requests work.
    assert client.health().status == "ok"
    assert train(run, 2) == [1, 2]
    info = run.info()
    assert (info.step, info.restored_from) == (2, None)
    assert (
        len(
            run.sample(["hi"], num_samples=2, sampling_params=SamplingParams(max_tokens=3))
            .result(timeout=60)
            .sequences[0]
        )
        == 2
    )


def test_errors_name_checkpoints_by_reference_never_by_server_path(server, client):
    run = client.create_training_run()
    data_dir = server.service.data_dir
    for name, broken in [("a", "training_state.json"), ("b", "optimizer.pt"), ("c", "adapter_model.safetensors")]:
        run.save_state(name).result(timeout=60)
        (data_dir / "checkpoints" / run.run_id / name / broken).unlink()
        with pytest.raises(JobFailedError) as load:
            run.load_state(name).result(timeout=60)
        with pytest.raises(APIStatusError) as copy:
            client.create_training_run(from_checkpoint=f"{run.run_id}/{name}")
        for message in (load.value.error, str(copy.value)):
            assert f"checkpoint {run.run_id}/{name}" in message and broken in message, message
            assert str(data_dir) not in message, message
    # An operating-system error the engine passes on as it is: a file where the run's folder goes.
    other = client.create_training_run()
    (data_dir / "checkpoints" / other.run_id).write_text("")
    with pytest.raises(JobFailedError) as save:
        other.save_state("x").result(timeout=60)
    assert "File exists" in save.value.error and str(data_dir) not in save.value.error, save.value.error


# ------------------------------------------------------------------------- idempotency
def test_idempotency_key_replays_instead_of_repeating(server, client):
    run = client.create_training_run(seed=3)
    twin = client.create_training_run(seed=3)  # identical adapter: the control
    url = f"{server.url}/v1/runs/{run.run_id}"
    body = {"data": [as_json(EXAMPLE)]}

    first = httpx.post(f"{url}/forward_backward", json=body, headers={"Idempotency-Key": "fb-1"})
    second = httpx.post(f"{url}/forward_backward", json=body, headers={"Idempotency-Key": "fb-1"})
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] == second.json()["job_id"]
    step_body = {"adam_params": {"learning_rate": 0.01}}
    steps = [httpx.post(f"{url}/optim_step", json=step_body, headers={"Idempotency-Key": "step-1"}) for _ in range(3)]
    assert len({r.json()["job_id"] for r in steps}) == 1
    result = APIFuture(client, steps[0].json()["job_id"], OptimStepResult.model_validate).result(timeout=60)
    assert result.step == 1 and run.info().step == 1  # applied once

    # The gradient was accumulated once too: same norm as one forward_backward on the twin.
    twin.forward_backward([EXAMPLE]).result(timeout=60)
    assert twin.optim_step(FAST).result(timeout=60).grad_norm == pytest.approx(result.grad_norm, rel=1e-5)

    # A replay after completion reports the finished job.
    again = httpx.post(f"{url}/forward_backward", json=body, headers={"Idempotency-Key": "fb-1"})
    assert again.json() == {"job_id": first.json()["job_id"], "status": "completed"}

    # Same key, different request: 409 (different body, another run, another operation).
    other_body = {"data": [as_json(datum_from_tokens(PROMPT, [1, 2]))]}
    for target, payload in [
        (f"{url}/forward_backward", other_body),
        (f"{server.url}/v1/runs/{twin.run_id}/forward_backward", body),
        (f"{url}/optim_step", {}),
    ]:
        conflict = httpx.post(target, json=payload, headers={"Idempotency-Key": "fb-1"})
        assert conflict.status_code == 409 and "fb-1" in conflict.json()["detail"], conflict.text
    assert run.info().step == 1


# -------------------------------------------------------------------------------- auth
def test_api_key_is_required_when_configured(make_server):
    with make_server(api_key="s3cret") as server:
        for method, path in [
            ("GET", "/v1/runs"),
            ("POST", "/v1/runs"),
            ("GET", "/v1/info"),
            ("GET", "/v1/tokenizer"),
            ("GET", "/v1/jobs/job_x"),
            ("POST", "/v1/sample"),
        ]:
            body = {"prompts": [{"text": "hi"}]} if path == "/v1/sample" else ({} if method == "POST" else None)
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cre"}, {"Authorization": "s3cret"}):
                response = httpx.request(method, server.url + path, json=body, headers=headers)
                assert response.status_code == 401, (path, headers, response.text)
        for headers in (
            {"X-API-Key": "s3cret"},
            {"Authorization": "Bearer s3cret"},
            {"Authorization": "bearer s3cret"},
        ):
            assert httpx.get(f"{server.url}/v1/runs", headers=headers).status_code == 200, headers
        assert httpx.get(f"{server.url}/health").status_code == 200  # liveness probes need no key

        with ServiceClient(server.url, max_retries=0) as anonymous:
            with pytest.raises(APIStatusError) as err:
                anonymous.list_runs()
            assert err.value.status_code == 401 and "API key" in str(err.value)

        with ServiceClient(server.url, api_key="s3cret") as service:
            run = service.create_training_run()
            assert train(run, 1) == [1]
            assert run.save_state("c").result(timeout=60).step == 1
            assert (
                len(run.sample(["hi"], sampling_params=SamplingParams(max_tokens=2)).result(timeout=60).sequences) == 1
            )
            assert [r.id for r in service.list_runs()] == [run.run_id]


def test_two_different_keys_in_one_request_are_refused_not_guessed_between(make_server, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"key-a": "alice", "key-b": "bob"}))
    with make_server(api_keys_file=keys) as server:
        url = f"{server.url}/v1/runs"
        for headers in (
            {"X-API-Key": "wrong", "Authorization": "Bearer key-a"},  # the wrong one won before, by luck of order
            {"X-API-Key": "key-a", "Authorization": "Bearer wrong"},
            {"X-API-Key": "key-a", "Authorization": "Bearer key-b"},  # two valid keys of two users
            # One header twice: the first copy used to win, whatever the second said.
            [("Authorization", "Bearer key-a"), ("Authorization", "Bearer key-b")],
            [("X-API-Key", "key-a"), ("X-API-Key", "key-b")],
            [("X-API-Key", "key-a"), ("X-API-Key", "wrong")],
        ):
            response = httpx.get(url, headers=headers)
            assert response.status_code == 401 and "not two different keys" in response.json()["detail"], headers
        for headers in (
            {"X-API-Key": "key-a", "Authorization": "Bearer key-a"},  # the same key twice
            {"X-API-Key": "key-a", "Authorization": "Basic dXNlcjpwdw=="},  # another scheme carries no key of ours
        ):
            assert httpx.get(url, headers=headers).status_code == 200, headers


def test_health_without_a_valid_key_says_only_that_the_server_is_alive(make_server, tiny_model_dir):
    with make_server(api_key="s3cret") as server:
        for headers in (
            {},
            {"X-API-Key": "wrong"},
            {"Authorization": "Bearer wrong"},
            {"X-API-Key": "wrong", "Authorization": "Bearer s3cret"},
        ):
            response = httpx.get(f"{server.url}/health", headers=headers)
            assert (response.status_code, response.json()) == (200, {"status": "ok"}), headers
        with ServiceClient(server.url, max_retries=0) as anonymous:
            assert anonymous.health().model_dump(exclude_none=True) == {"status": "ok"}
        with ServiceClient(server.url, api_key="s3cret") as service:
            service.create_training_run()
            health = service.health()
        assert (health.model, health.models, health.runs) == (str(tiny_model_dir), [str(tiny_model_dir)], 1)
        assert health.queued_jobs is not None and health.version


def test_doctor_checks_a_running_server(server, client):
    from eztinker.cli import _check_server

    client.create_training_run()
    assert _check_server(server.url).startswith(f"{server.url}: model {client.health().model}, 1 runs; tokenizer loads")


def test_users_only_see_their_own_runs(make_server, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"key-a": "alice", "key-b": "bob"}))
    with (
        make_server(api_keys_file=keys) as server,
        ServiceClient(server.url, api_key="key-a", max_retries=0) as alice,
        ServiceClient(server.url, api_key="key-b", max_retries=0) as bob,
    ):
        run = alice.create_training_run()
        train(run, 1)
        saving = run.save_state("a1")
        saving.result(timeout=60)
        bobs_run = bob.create_training_run()

        assert [r.id for r in alice.list_runs()] == [run.run_id]
        assert [r.id for r in bob.list_runs()] == [bobs_run.run_id]

        as_bob = TrainingClient(bob, run.run_id)
        attempts = {
            "get": lambda: bob.training_client(run.run_id),
            "info": as_bob.info,
            "sample": lambda: as_bob.sample(["hi"]),
            "score": lambda: as_bob.score("hi", ["there"]),
            "forward_backward": lambda: as_bob.forward_backward([EXAMPLE]),
            "optim_step": lambda: as_bob.optim_step(),
            "save": lambda: as_bob.save_state("mine"),
            "load into alice's run": lambda: as_bob.load_state("a1"),
            "load alice's checkpoint": lambda: bobs_run.load_state(f"{run.run_id}/a1"),
            "copy alice's checkpoint": lambda: bob.create_training_run(from_checkpoint=f"{run.run_id}/a1"),
            "alice's job": lambda: bob.job(saving.job_id),
            "delete": as_bob.delete,
        }
        for what, attempt in attempts.items():
            with pytest.raises(APIStatusError) as err:
                attempt()
            assert err.value.status_code == 404, what
        # Indistinguishable from a run that does not exist at all.
        missing = httpx.get(f"{server.url}/v1/runs/run_0000000000000000", headers={"X-API-Key": "key-b"})
        foreign = httpx.get(f"{server.url}/v1/runs/{run.run_id}", headers={"X-API-Key": "key-b"})
        assert foreign.json()["detail"].replace(run.run_id, "ID") == missing.json()["detail"].replace(
            "run_0000000000000000", "ID"
        )

        # Alice still can, and nothing of hers changed.
        info = run.info()
        assert (info.step, [c.name for c in info.checkpoints]) == (1, ["a1"])
        assert run.load_state("a1").result(timeout=60)["step"] == 1
        assert alice.create_training_run(from_checkpoint=f"{run.run_id}/a1").info().step == 1
        assert alice.job(saving.job_id).status.value == "completed"
        assert len(run.sample(["hi"], sampling_params=SamplingParams(max_tokens=2)).result(timeout=60).sequences) == 1
        assert [r.id for r in bob.list_runs()] == [bobs_run.run_id]


def test_a_runs_info_reads_its_own_history_only(server, client):
    """One run's info (status, last loss, last activity) comes from that run's rows alone, and
    equals what the listing of all of the owner's runs says of it."""
    trained, saved, fresh = (client.create_training_run() for _ in range(3))
    train(trained, 2)
    saved.save_state("s1").result(timeout=60)
    # A long job on one run, a step of another queued behind it: both are working meanwhile.
    blocker, queued = trained.forward_backward(slow_batch(1200)), saved.optim_step(FAST)
    statuses = {run.run_id: run.info().status for run in (trained, saved, fresh)}
    blocker.result(timeout=120), queued.result(timeout=120)
    assert statuses == {trained.run_id: "working", saved.run_id: "working", fresh.run_id: "idle"}

    infos = {run.run_id: run.info() for run in (trained, saved, fresh)}
    listed = {info.id: info for info in client.list_runs()}
    assert infos[trained.run_id].last_loss is not None and infos[trained.run_id].updated_at is not None
    assert infos[saved.run_id].last_loss is None and infos[saved.run_id].updated_at is not None
    assert (infos[fresh.run_id].last_loss, infos[fresh.run_id].updated_at) == (None, None)
    for run_id, info in infos.items():
        assert (info.status, info.last_loss, info.updated_at) == (
            listed[run_id].status,
            listed[run_id].last_loss,
            listed[run_id].updated_at,
        )
    store = server.service.store
    owner = store.run(fresh.run_id).owner
    assert store.last_losses(owner, fresh.run_id) == {} and store.last_activity(owner, fresh.run_id) == {}
    assert set(store.last_losses(owner, trained.run_id)) == {trained.run_id}
    assert set(store.last_activity(owner, saved.run_id)) == {saved.run_id}


def test_public_bind_needs_an_api_key(monkeypatch, tmp_path):
    for name in ("EZTINKER_API_KEY", "EZTINKER_API_KEYS_FILE", "EZTINKER_HOST"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="--api-key"):
        ServerSettings(host="0.0.0.0", data_dir=tmp_path)
    assert ServerSettings(host="0.0.0.0", api_key="k", data_dir=tmp_path).user_keys() == {"k": "default"}
    for loopback in ("127.0.0.1", "localhost", "::1"):
        assert ServerSettings(host=loopback, data_dir=tmp_path).user_keys() == {}


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_a_blank_api_key_is_refused_not_taken_as_no_auth(monkeypatch, tmp_path, blank):
    # A blank key once passed the public-bind check and then matched requests carrying no key.
    for name in ("EZTINKER_API_KEY", "EZTINKER_API_KEYS_FILE", "EZTINKER_HOST"):
        monkeypatch.delenv(name, raising=False)
    for host in ("0.0.0.0", "127.0.0.1"):
        with pytest.raises(ValueError, match="(?s)api_key.*empty or blank"):
            ServerSettings(host=host, api_key=blank, data_dir=tmp_path)
    monkeypatch.setenv("EZTINKER_API_KEY", blank)
    with pytest.raises(ValueError, match="(?s)api_key.*empty or blank"):
        ServerSettings(host="0.0.0.0", data_dir=tmp_path)


def test_a_keys_file_must_hold_non_blank_keys_and_users(monkeypatch, tmp_path):
    monkeypatch.delenv("EZTINKER_API_KEY", raising=False)
    keys = tmp_path / "keys.json"
    for content, problem in [
        ("{}", "holds no keys"),
        ('{"": "alice"}', "key 1 is empty or blank"),
        ('{"key-a": "alice", "  ": "bob"}', "key 2 is empty or blank"),
        ('{"key-a": ""}', "the user of key 1 is empty or blank"),
        ('{"key-a": " "}', "the user of key 1 is empty or blank"),
        ('{"key-a": 1}', "must be a JSON object"),
        ('["key-a"]', "must be a JSON object"),
        ("{not json", "not JSON"),
    ]:
        keys.write_text(content)
        for host in ("0.0.0.0", "127.0.0.1"):
            with pytest.raises(ValueError, match=problem) as err:
                ServerSettings(host=host, api_keys_file=keys, data_dir=tmp_path)
            assert str(keys) in str(err.value) and "key-a" not in str(err.value), content  # keys are secrets
    with pytest.raises(ValueError, match="No such file"):
        ServerSettings(api_keys_file=tmp_path / "missing.json", data_dir=tmp_path)  # at once, not at start-up
    keys.write_text('{"key-a": "alice"}')
    settings = ServerSettings(host="0.0.0.0", api_keys_file=keys, data_dir=tmp_path)
    keys.unlink()  # read once, when the settings are made
    assert settings.user_keys() == {"key-a": "alice"}


def test_connection_refused_says_how_to_start_a_server():
    url = f"http://127.0.0.1:{closed_port()}"
    with ServiceClient(url, max_retries=0) as service:
        with pytest.raises(ConnectionFailedError) as err:
            service.health()
        with pytest.raises(ConnectionFailedError):
            service.create_training_run()
    assert "eztinker server" in str(err.value) and url in str(err.value)
    with pytest.raises(ValueError, match="http://"):
        ServiceClient("127.0.0.1:8000")  # no scheme: said at once, not as an httpx error later
