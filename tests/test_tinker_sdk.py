"""The official Tinker SDK (`tinker` 0.38) against a real `eztinker server` subprocess on the tiny
Qwen2: every call it makes, with results checked for meaning. No stand-in for either side."""

from __future__ import annotations

import io
import json
import tarfile
import threading

import httpx
import pytest

tinker = pytest.importorskip("tinker", reason="the Tinker API needs the tinker package: pip install 'eztinker[tinker]'")
import torch  # noqa: E402
from support import TINY_IM_END, TINY_VOCAB  # noqa: E402
from tinker import types  # noqa: E402

from eztinker import ServiceClient as EZServiceClient  # noqa: E402
from eztinker import datum_from_tokens  # noqa: E402
from eztinker.launcher import ServerProcess, offline_env  # noqa: E402

ALICE, BOB = "tml-alice-key", "tml-bob-key"
GATHER_MS = 250
PROMPT, REPLY = [100, 200, 300], [400, 500, 600, 700]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tinker-server")
    keys = root / "keys.json"
    keys.write_text(json.dumps({ALICE: "alice", BOB: "bob"}))
    # The SDK's requests for one batch arrive a few ms apart, but CI runs a CPU-bound test on the
    # other core beside this one, which can stretch a gap past the 50 ms default: hence 250.
    args = ["--device", "cpu", "--api-keys-file", str(keys), "--sample-gather-ms", str(GATHER_MS)]
    with ServerProcess(
        model=str(tiny_model_dir),
        data_dir=root / "data",
        log_file=root / "server.log",
        extra_args=args,
        env=offline_env(),
        startup_timeout=120,
        poll_interval=0.05,
    ) as running:
        yield running


@pytest.fixture(autouse=True)
def _offline_sdk(monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture()
def service(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    yield client
    client.close("success").result()


@pytest.fixture()
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def datum(prompt=PROMPT, reply=REPLY, weights=None) -> types.Datum:
    tokens = prompt + reply
    weights = weights if weights is not None else [0.0] * (len(prompt) - 1) + [1.0] * len(reply)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def logprobs_of(output) -> list[float]:
    """Every datum's per-position logprobs, concatenated."""
    return [float(lp) for out in output.loss_fn_outputs for lp in out["logprobs"].tolist()]


def train(client, steps: int, data=None, lr: float = 1e-2) -> list[float]:
    futures = [
        (
            client.forward_backward(data or [datum()], "cross_entropy"),
            client.optim_step(types.AdamParams(learning_rate=lr)),
        )
        for _ in range(steps)
    ]
    return [fb.result().metrics["loss:sum"] for fb, opt in futures if opt.result() is not None]


# -------------------------------------------------------------------------- the service
def test_capabilities_info_and_tokenizer(service, model):
    caps = service.get_server_capabilities()
    assert [(m.model_name, m.trainable, m.sampleable) for m in caps.supported_models] == [(model, True, True)]
    client = service.create_lora_training_client(base_model=model, rank=4)
    info = client.get_info()
    assert (info.model_id, info.is_lora, info.lora_rank, info.model_data.model_name) == (
        client.model_id,
        True,
        4,
        model,
    )
    assert client.model_id.endswith(":train:0")
    tokenizer = client.get_tokenizer()  # loads offline, from the model's folder
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == TINY_IM_END


def test_training_lowers_the_loss_and_forward_equals_forward_backward(service, model):
    client = service.create_lora_training_client(base_model=model, rank=4)
    forward = client.forward([datum()], "cross_entropy").result()
    backward = client.forward_backward([datum()], "cross_entropy").result()
    assert logprobs_of(forward) == pytest.approx(logprobs_of(backward), abs=1e-5)
    lps = logprobs_of(forward)
    assert len(lps) == len(PROMPT) + len(REPLY) - 1 and all(lp < 0 for lp in lps)  # every position, not only weighted
    assert forward.metrics["loss:sum"] == pytest.approx(-sum(lps[len(PROMPT) - 1 :]), rel=1e-5)
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    losses = train(client, 4)
    assert losses[-1] < losses[0] - 0.5, losses
    after = client.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    assert after < forward.metrics["loss:sum"] - 1.0


def test_custom_loss_gives_the_gradient_autograd_gives(service, model):
    """forward_backward_custom sends minus the custom loss's gradient as signed cross_entropy
    weights; a twin run trained with cross_entropy on the weights autograd gives must match."""

    def custom(data, logprobs):
        loss = sum((lp**2).sum() * 0.01 + 2 * lp[-1] for lp in logprobs)
        return loss, {"custom:sum": float(loss)}

    a = service.create_lora_training_client(base_model=model, rank=4, seed=3)
    b = service.create_lora_training_client(base_model=model, rank=4, seed=3)
    out = a.forward_backward_custom([datum()], custom).result()
    a.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    lps = torch.tensor(logprobs_of(b.forward([datum()], "cross_entropy").result()), requires_grad=True)
    loss, _ = custom(None, [lps])
    loss.backward()
    assert out.metrics["loss:sum"] == pytest.approx(float(loss), rel=1e-4)
    signed = (-lps.grad).tolist()
    assert any(w < 0 for w in signed) and any(w > 0 for w in signed)  # genuinely signed weights
    b.forward_backward([datum(weights=signed)], "cross_entropy").result()
    b.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after_a = logprobs_of(a.forward([datum()], "cross_entropy").result())
    after_b = logprobs_of(b.forward([datum()], "cross_entropy").result())
    assert after_a == pytest.approx(after_b, abs=1e-4)
    assert after_a != pytest.approx(lps.tolist(), abs=1e-3)  # the step did move the weights


def test_saved_state_reloads_to_identical_losses(service, model):
    client = service.create_lora_training_client(base_model=model, rank=4)
    train(client, 2)
    path = client.save_state("two").result().path
    assert path == f"tinker://{client.model_id}/weights/two"
    at_two = logprobs_of(client.forward([datum()], "cross_entropy").result())
    next_with_optimizer = train(client, 2)
    assert logprobs_of(client.forward([datum()], "cross_entropy").result()) != pytest.approx(at_two, abs=1e-4)

    client.load_state_with_optimizer(path).result()
    assert logprobs_of(client.forward([datum()], "cross_entropy").result()) == pytest.approx(at_two, abs=1e-6)
    assert train(client, 2) == pytest.approx(next_with_optimizer, rel=1e-5)  # the Adam moments came back too

    copy = service.create_training_client_from_state_with_optimizer(path)
    assert logprobs_of(copy.forward([datum()], "cross_entropy").result()) == pytest.approx(at_two, abs=1e-6)
    assert train(copy, 2) == pytest.approx(next_with_optimizer, rel=1e-5)
    fresh_optimizer = service.create_training_client_from_state(path)
    assert logprobs_of(fresh_optimizer.forward([datum()], "cross_entropy").result()) == pytest.approx(at_two, abs=1e-6)
    assert train(fresh_optimizer, 2) != pytest.approx(next_with_optimizer, rel=1e-5)  # moments start from zero


# ---------------------------------------------------------------------------- sampling
GREEDY = types.SamplingParams(max_tokens=6, temperature=0.0)


def greedy(sampler, prompt=PROMPT) -> list[int]:
    return list(sampler.sample(types.ModelInput.from_ints(prompt), 1, GREEDY).result().sequences[0].tokens)


def test_a_sampler_snapshot_stays_fixed_while_the_run_trains(service, model):
    client = service.create_lora_training_client(base_model=model, rank=4)
    train(client, 3, lr=5e-2)
    snapshot = service.create_sampling_client(model_path=client.save_weights_for_sampler("s3").result().path)
    live_before = client.save_weights_and_get_sampling_client()
    fixed = greedy(snapshot)
    assert greedy(live_before) == fixed
    train(client, 5, data=[datum(reply=[11, 12, 13, 14, 15, 16])], lr=5e-2)
    assert greedy(snapshot) == fixed and greedy(live_before) == fixed  # snapshots: however the run trains
    assert greedy(client.save_weights_and_get_sampling_client()) != fixed
    base = service.create_sampling_client(base_model=model)
    assert base.get_base_model() == model and greedy(base) != fixed


def test_sampling_parameters(service, model):
    client = service.create_lora_training_client(base_model=model, rank=4)
    sampler = client.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=7, top_k=50, top_p=0.9)
    out = sampler.sample(prompt, 3, params).result()
    assert len(out.sequences) == 3 and all(len(s.tokens) == len(s.logprobs) <= 5 for s in out.sequences)
    assert all(s.stop_reason in ("length", "stop") for s in out.sequences)
    assert len({s.sequence_id for s in out.sequences}) == 3
    again = sampler.sample(prompt, 3, params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in out.sequences]  # seeded
    one = types.SamplingParams(max_tokens=5, temperature=1.0, seed=7, top_k=50, top_p=0.9)
    first = list(sampler.sample(prompt, 1, one).result().sequences[0].tokens)
    stop_at = first[1]
    stopped = sampler.sample(prompt, 1, one.model_copy(update={"stop": [stop_at]})).result().sequences[0]
    assert list(stopped.tokens) == first[: first.index(stop_at) + 1] and stopped.stop_reason == "stop"

    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT + REPLY)).result()
    assert logprobs[0] is None and len(logprobs) == len(PROMPT + REPLY)
    forward = logprobs_of(client.forward([datum(weights=[1.0] * 6)], "cross_entropy").result())
    assert logprobs[1:] == pytest.approx(forward, abs=1e-4)
    topk = sampler.sample(
        types.ModelInput.from_ints(PROMPT + REPLY),
        1,
        types.SamplingParams(max_tokens=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
    ).result()
    assert topk.prompt_logprobs[1:] == pytest.approx(forward, abs=1e-4)
    for row, lp in zip(topk.topk_prompt_logprobs[1:], forward):
        assert len(row) == 3 and row[0][1] >= row[1][1] >= row[2][1] >= lp - 1e-4


def sample_batches(server) -> tuple[float, float]:
    """(batches, requests) the server has decoded, from its /metrics histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ALICE}"}).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples["eztinker_sample_batch_requests_count"], samples["eztinker_sample_batch_requests_sum"]


def test_requests_sent_together_decode_as_one_batch_with_the_same_samples(service, server, model):
    """The SDK sends one request per prompt; the server gathers those that arrive together into
    one batch (sample_gather_ms), and a seeded request's samples do not depend on the batch."""
    sampler = service.create_lora_training_client(base_model=model, rank=4).save_weights_and_get_sampling_client()
    prompts = [types.ModelInput.from_ints([100 + i, 200, 300 + 7 * i]) for i in range(8)]
    params = [types.SamplingParams(max_tokens=6, temperature=1.0, seed=i) for i in range(8)]
    alone = [list(sampler.sample(p, 2, q).result().sequences[1].tokens) for p, q in zip(prompts, params)]
    batches, requests = sample_batches(server)
    futures = [sampler.sample(p, 2, q) for p, q in zip(prompts, params)]
    together = [list(f.result().sequences[1].tokens) for f in futures]
    after = sample_batches(server)
    assert together == alone
    assert (after[0] - batches, after[1] - requests) == (1, 8)  # with --sample-gather-ms 0: 2 batches (1 + 7)


def test_two_training_clients_do_not_affect_each_other(service, model):
    a = service.create_lora_training_client(base_model=model, rank=4, seed=5)
    b = service.create_lora_training_client(base_model=model, rank=4, seed=5)
    before = logprobs_of(b.forward([datum()], "cross_entropy").result())
    futures = [
        (
            a.forward_backward([datum()], "cross_entropy"),
            a.optim_step(types.AdamParams(learning_rate=5e-2)),
            b.forward([datum()], "cross_entropy"),
        )
        for _ in range(3)
    ]
    assert all(logprobs_of(f[2].result()) == pytest.approx(before, abs=1e-6) for f in futures)
    assert logprobs_of(a.forward([datum()], "cross_entropy").result()) != pytest.approx(before, abs=1e-3)


def test_rest_and_tinker_see_one_run_and_give_the_same_loss(service, server, model):
    client = service.create_lora_training_client(base_model=model, rank=4)
    train(client, 2)
    tinker_loss = client.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    with EZServiceClient(server.url, api_key=ALICE) as rest:
        run = rest.training_client(client.model_id)  # a Tinker model is an EZTinker run
        assert run.info().step == 2
        rest_loss = run.forward_backward([datum_from_tokens(PROMPT, REPLY)]).result(timeout=60).loss
        assert rest_loss == pytest.approx(tinker_loss, rel=1e-5)
        created = rest.create_training_run(lora_rank=2)
        assert created.run_id in {
            r.training_run_id
            for r in tinker.RestClient(base_url=server.url, api_key=ALICE)
            .list_training_runs(limit=1000)
            .result()
            .training_runs
        }


# ------------------------------------------------------------------------------ losses
def rl_datum(advantage: float = 1.0) -> types.Datum:
    tokens = PROMPT + REPLY
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [-12.0] * n,
            "advantages": [0.0, 0.0] + [advantage] * (n - 2),
        },
    )


@pytest.mark.parametrize(
    "loss_fn,config",
    [
        ("importance_sampling", None),
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
        ("cispo", None),
        ("dro", {"beta": 0.1}),
    ],
)
def test_rl_losses_follow_their_formulas(service, model, loss_fn, config):
    client = service.create_lora_training_client(base_model=model, rank=4)
    lp = torch.tensor(logprobs_of(client.forward([datum(weights=[1.0] * 6)], "cross_entropy").result()))
    out = client.forward_backward([rl_datum()], loss_fn, config).result()
    ratio, adv, q = torch.exp(lp - (-12.0)), torch.tensor([0.0, 0.0, 1, 1, 1, 1]), torch.full_like(lp, -12.0)
    lo, hi = (config or {}).get("clip_low_threshold", 0.8), (config or {}).get("clip_high_threshold", 1.2)
    expected = {
        "importance_sampling": -(ratio * adv).sum(),
        "ppo": -torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv).sum(),
        "cispo": -(ratio.clamp(lo, hi) * lp * adv).sum(),
        "dro": -(lp * adv - 0.5 * (config or {}).get("beta", 0.05) * (lp - q) ** 2 * (adv != 0)).sum(),
    }[loss_fn]
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-4)
    assert client.optim_step(types.AdamParams(learning_rate=1e-2)).result() is not None


def test_a_loss_the_server_lacks_fails_with_category_user(service, model):
    client = service.create_lora_training_client(base_model=model, rank=4)
    with pytest.raises(tinker.RequestFailedError) as err:
        client.forward_backward([rl_datum()], "made_up_loss").result()  # every LossFnType but custom is served
    assert err.value.category == types.RequestErrorCategory.User
    assert "made_up_loss" in str(err.value) and "stable_reinforce" in str(err.value)


# ------------------------------------------------------------------------- bad input
def test_bad_input_gets_a_tinker_error_naming_the_problem(service, server, model):
    client = service.create_lora_training_client(base_model=model, rank=4)
    with pytest.raises(tinker.RequestFailedError) as err:
        client.forward_backward([datum(prompt=[1, TINY_VOCAB + 3])], "cross_entropy").result()
    assert "outside the vocabulary" in str(err.value)
    image = types.ModelInput(
        chunks=[
            types.EncodedTextChunk(tokens=[1, 2]),
            types.ImageChunk(data=b"\x89PNG....", format="png", expected_tokens=4),
        ]
    )
    with pytest.raises(Exception) as err:
        client.save_weights_and_get_sampling_client().sample(image, 1, GREEDY).result()
    assert "text-only" in str(err.value)
    with pytest.raises(Exception) as err:
        service.create_lora_training_client(base_model="Qwen/Qwen3-235B", rank=4).get_info()
    assert model in str(err.value)  # the error lists the models the server holds
    response = httpx.post(
        f"{server.url}/api/v1/forward_backward",
        content=b"\xff\x00garbage",
        headers={"X-API-Key": ALICE, "Content-Type": "application/x-protobuf"},
    )
    assert response.status_code == 400 and "malformed" in response.json()["error"]
    mismatched = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0]},
    )
    with pytest.raises(Exception) as err:
        client.forward_backward([mismatched], "cross_entropy").result()
    assert "weights" in str(err.value)


# ----------------------------------------------------------------- checkpoints (REST)
def test_rest_client_lists_deletes_and_downloads_checkpoints(service, server, model, tiny_model_dir):
    import peft
    from transformers import AutoModelForCausalLM

    client = service.create_lora_training_client(base_model=model, rank=4)
    train(client, 1)
    state = client.save_state("one").result().path
    sampler = client.save_weights_for_sampler("one").result().path
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    run = rest.get_training_run(client.model_id).result()
    assert (run.base_model, run.lora_rank, run.last_checkpoint.tinker_path) == (model, 4, state)
    listed = rest.list_checkpoints(client.model_id).result().checkpoints
    assert {(c.checkpoint_id, c.checkpoint_type) for c in listed} == {
        ("weights/one", "training"),
        ("sampler_weights/one", "sampler"),
    }
    info = rest.get_weights_info_by_tinker_path(state).result()
    assert (info.base_model, info.lora_rank, info.is_lora) == (model, 4, True)

    # The archive route answers a signed URL (SDKs 0.25-0.34's contract); the URL needs no key.
    signed = httpx.get(
        f"{server.url}/api/v1/training_runs/{client.model_id}/checkpoints/weights/one/archive",
        headers={"X-API-Key": ALICE, "Accept": "application/json"},
    )
    assert signed.status_code == 200
    archive = httpx.get(signed.json()["url"])
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        folder = server.log_file.parent / "adapter"
        tar.extractall(folder, filter="data")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, folder)  # the plain PEFT adapter
    with torch.no_grad():
        logits = peft_model(torch.tensor([PROMPT + REPLY[:-1]])).logits.log_softmax(-1)[0]
    targets = (PROMPT + REPLY)[1:]
    expected = [float(logits[i, t]) for i, t in enumerate(targets)]
    assert logprobs_of(client.forward([datum(weights=[1.0] * 6)], "cross_entropy").result()) == pytest.approx(
        expected, abs=1e-4
    )

    rest.delete_checkpoint_from_tinker_path(sampler).result()
    assert [c.checkpoint_id for c in rest.list_checkpoints(client.model_id).result().checkpoints] == ["weights/one"]
    with pytest.raises(tinker.NotFoundError):
        service.create_sampling_client(model_path=sampler).sample(
            types.ModelInput.from_ints(PROMPT), 1, GREEDY
        ).result()


def test_another_users_runs_answer_as_if_absent(service, server, model):
    client = service.create_lora_training_client(base_model=model, rank=4)
    path = client.save_state("mine").result().path
    bob = tinker.ServiceClient(base_url=server.url, api_key=BOB)
    try:  # closed, or its session's heartbeat outlives the module's server and logs failures
        bob_rest = tinker.RestClient(base_url=server.url, api_key=BOB)
        assert client.model_id not in {
            r.training_run_id for r in bob_rest.list_training_runs(limit=1000).result().training_runs
        }
        with pytest.raises(Exception) as err:
            bob_rest.list_checkpoints(client.model_id).result()
        assert "not found" in str(err.value)
        with pytest.raises(Exception) as err:
            bob.create_training_client_from_state(path).get_info()
        assert "not found" in str(err.value)
    finally:
        bob.close("success").result()
    wrong = httpx.post(
        f"{server.url}/api/v1/get_info", json={"model_id": client.model_id}, headers={"X-API-Key": "tml-nobody"}
    )
    assert wrong.status_code == 401 and "error" in wrong.json()


# ------------------------------------------------------------------ protocol mechanics
def test_training_requests_run_in_seq_id_order(service, server, model):
    """A request that arrives before its predecessor waits for it: seq 2 (an optim_step) sent
    first still runs after seq 1 (a forward_backward)."""
    client = service.create_lora_training_client(base_model=model, rank=4)
    headers = {"X-API-Key": ALICE}
    answers: dict = {}

    def optim_first():
        answers["optim"] = httpx.post(
            f"{server.url}/api/v1/optim_step",
            headers=headers,
            timeout=60,
            json={"model_id": client.model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.05}},
        ).json()

    thread = threading.Thread(target=optim_first)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive()  # waiting for seq 1
    body = _forward_backward_proto(client.model_id, 1, datum())
    answers["fb"] = httpx.post(
        f"{server.url}/api/v1/forward_backward",
        headers={**headers, "Content-Type": "application/x-protobuf"},
        content=body,
        timeout=60,
    ).json()
    thread.join(60)
    with EZServiceClient(server.url, api_key=ALICE) as rest:
        fb, opt = (rest.job(answers[k]["request_id"], wait=30) for k in ("fb", "optim"))
        assert fb.status.value == opt.status.value == "completed"
        assert fb.started_at <= opt.started_at and opt.result["grad_norm"] > 0  # the step saw the gradient


def _forward_backward_proto(model_id: str, seq_id: int, d: types.Datum) -> bytes:
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    item = msg.data.add()
    item.model_input.add().encoded_text.tokens = np.asarray(d.model_input.to_ints(), np.int32).tobytes()
    for name, dtype, code in (("target_tokens", np.int64, pb.DTYPE_INT64), ("weights", np.float32, pb.DTYPE_FLOAT32)):
        values = np.asarray(d.loss_fn_inputs[name].tolist(), dtype)
        item.loss_fn_inputs[name].dense = values.tobytes()
        item.loss_fn_inputs[name].dtype = code
        item.loss_fn_inputs[name].shape.append(len(values))
    return msg.SerializeToString()


def test_idempotency_key_replays_and_sessions_end(service, server, model):
    client = service.create_lora_training_client(base_model=model, rank=4)
    headers = {"X-API-Key": ALICE, "X-Idempotency-Key": "same-key-1"}
    body = {"model_id": client.model_id, "adam_params": {"learning_rate": 0.01}}
    first = httpx.post(f"{server.url}/api/v1/optim_step", headers=headers, json=body).json()
    again = httpx.post(f"{server.url}/api/v1/optim_step", headers=headers, json=body).json()
    assert first["request_id"] == again["request_id"]
    session = httpx.post(f"{server.url}/api/v1/create_session", headers={"X-API-Key": ALICE}, json={}).json()
    beat = httpx.post(f"{server.url}/api/v1/session_heartbeat", headers={"X-API-Key": ALICE}, json=session)
    assert beat.status_code == 200
    httpx.post(
        f"{server.url}/api/v1/sessions/{session['session_id']}/finish",
        headers={"X-API-Key": ALICE},
        json={"reason": {"type": "success"}},
    ).raise_for_status()
    assert (
        httpx.post(f"{server.url}/api/v1/session_heartbeat", headers={"X-API-Key": ALICE}, json=session).status_code
        == 410
    )
    assert httpx.post(f"{server.url}/api/v1/telemetry", headers={"X-API-Key": ALICE}, json={"events": []}).json() == {
        "status": "accepted"
    }


def test_unnamed_snapshots_of_a_run_are_bounded_on_disk(service, server, model):
    """An RL loop makes a sampling client of its current weights every iteration: only the newest
    four of a run's unnamed snapshots are kept, and the newest samples."""
    client = service.create_lora_training_client(base_model=model, rank=4)
    for _ in range(6):
        assert len(greedy(client.save_weights_and_get_sampling_client())) >= 1
    # They are the server's own: not listed (the user never named them), pruned on disk.
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    assert [
        c for c in rest.list_checkpoints(client.model_id).result().checkpoints if c.checkpoint_type == "sampler"
    ] == []
    kept = list((server.log_file.parent / "data" / "checkpoints" / client.model_id).iterdir())
    assert len(kept) == 4 and all(p.name.startswith("sampler_weights._") for p in kept)
