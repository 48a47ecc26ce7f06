"""The Ray backend: a local Ray cluster of two nodes started here (1 CPU each) and one `eztinker server --backend ray`
subprocess on it, with two workers of the tiny Qwen2 and one of the tiny Llama, driven through
the REST SDK and the official Tinker SDK. Runs spread over the workers, train exactly as on the
local backend, load each other's checkpoints across workers, and survive losing a worker.

One cluster and one server serve the whole module (Ray and its actors take ~20 s to start);
each test deletes its runs, so the next finds the workers empty, and the worker-loss test is last.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs ray: pip install 'eztinker[ray]'")
from support import EXAMPLE, FAST, PROMPT, score, slow_batch  # noqa: E402

from eztinker import JobFailedError, SamplingParams, ServiceClient  # noqa: E402
from eztinker.launcher import ServerProcess, offline_env  # noqa: E402
from eztinker.tiny import make_tiny_llama  # noqa: E402

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> list[str]:
    return [str(tiny_model_dir), str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))]


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, one CPU each (a head and a worker node, as on two machines);
    their workers inherit this environment (PYTHONPATH, offline Hub)."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False},
    )
    nodes.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    ray.init(address=nodes.address, logging_level="error")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def server(cluster, models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-server")
    # Three workers of half a CPU each fit the two CPUs (torch runs one thread in each).
    args = [
        "--backend",
        "ray",
        "--ray-address",
        cluster,
        "--workers-per-model",
        "2",
        "--workers-per-model",
        "1",
        "--worker-cpus",
        "0.5",
        "--checkpoint-dir",
        str(root / "shared-checkpoints"),
        "--device",
        "cpu",
    ]
    with ServerProcess(
        model=models,
        data_dir=root / "data",
        log_file=root / "server.log",
        extra_args=args,
        env=offline_env(),
        startup_timeout=180,
        poll_interval=0.1,
    ) as running:
        yield running


@pytest.fixture()
def client(server):
    with ServiceClient(server.url, max_retries=0) as client:
        yield client
        for run in client.list_runs():  # the next test finds every worker empty
            client.training_client(run.id).delete()


def placement(client) -> dict[str, str]:
    """run id -> the worker it is on."""
    return {run: worker.name for worker in client.health().workers if worker.alive for run in worker.runs}


def trained(client, model: str, seed: int) -> tuple[object, list[float], list[int]]:
    """A rank-2 run of `model` with `seed` after two steps: (run, its losses, a greedy sample)."""
    run = client.create_training_run(lora_rank=2, seed=seed, base_model=model)
    losses = []
    for _ in range(2):
        fb = run.forward_backward([EXAMPLE])
        run.optim_step(FAST).result(timeout=60)
        losses.append(fb.result(timeout=60).loss)
    sample = run.sample([PROMPT], num_samples=1, sampling_params=GREEDY).result(timeout=60)
    return run, losses, sample.sequences[0][0].tokens


def test_runs_spread_over_workers_and_train_as_on_the_local_backend(client, models, make_server):
    qwen, llama = models
    on_ray = {seed: trained(client, qwen, seed) for seed in (1, 2)}
    on_ray[3] = trained(client, llama, 3)
    workers = {w.name: w for w in client.health().workers}
    assert sorted(w.model for w in workers.values()) == sorted([qwen, qwen, llama])
    where = placement(client)
    # Least loaded: the two Qwen2 runs are on its two workers, the Llama run on its one.
    assert {where[on_ray[1][0].run_id], where[on_ray[2][0].run_id]} == {w for w in workers if workers[w].model == qwen}
    assert workers[where[on_ray[3][0].run_id]].model == llama

    with make_server(model=models) as local, ServiceClient(local.url, max_retries=0) as local_client:
        for seed, model in ((1, qwen), (2, qwen), (3, llama)):
            _, losses, tokens = trained(local_client, model, seed)
            assert on_ray[seed][1] == pytest.approx(losses, rel=1e-5) and on_ray[seed][2] == tokens
    assert on_ray[1][1] != on_ray[2][1]  # the seeds matter: the runs are not all one


def test_a_checkpoint_saved_on_one_worker_loads_on_the_other(client, models):
    saver, _, _ = trained(client, models[0], seed=5)
    saver.save_state("ck").result(timeout=60)
    loader = client.create_training_run(lora_rank=2, seed=6)
    where = placement(client)
    assert where[saver.run_id] != where[loader.run_id]
    assert score(loader) != score(saver)
    assert loader.load_state(f"{saver.run_id}/ck").result(timeout=60)["step"] == 2
    assert score(loader) == pytest.approx(score(saver), abs=1e-5)
    # A new run from the checkpoint, and a snapshot sample on whichever worker is free.
    copy = client.create_training_run(from_checkpoint=f"{saver.run_id}/ck")
    assert copy.info().step == 2 and score(copy) == pytest.approx(score(saver), abs=1e-5)


def test_the_tinker_sdk_trains_and_samples_over_ray(server, models, monkeypatch):
    tinker = pytest.importorskip("tinker")
    from tinker import types

    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    service = tinker.ServiceClient(base_url=server.url, api_key="tml-ray-test")
    try:
        training = service.create_lora_training_client(base_model=models[1], rank=2)
        tokens = PROMPT + [400, 500, 600]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0, 0.0, 1.0, 1.0, 1.0]},
        )
        losses = []
        for _ in range(3):
            fb = training.forward_backward([datum], "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            losses.append(fb.result().metrics["loss:sum"])
        assert losses[2] < losses[0]
        sampler = training.save_weights_and_get_sampling_client()
        result = sampler.sample(
            types.ModelInput.from_ints(PROMPT), 2, types.SamplingParams(max_tokens=4, seed=1)
        ).result()
        assert [len(s.tokens) for s in result.sequences] == [4, 4]
    finally:
        service.close("success").result()
        with ServiceClient(server.url, max_retries=0) as client:
            for run in client.list_runs():
                client.training_client(run.id).delete()


def test_openai_streams_arrive_token_by_token_from_a_worker(server, models):
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    chat = [{"role": "user", "content": "Count to five."}]
    whole = oa.chat.completions.create(model=models[0], messages=chat, max_tokens=8, seed=3)
    chunks = list(oa.chat.completions.create(model=models[0], messages=chat, max_tokens=8, seed=3, stream=True))
    # As decoded, not one block at the end (a busy machine may deliver a few tokens per chunk).
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_abandoned_samples_stop_decoding_on_a_worker(server, models):
    """The runner's cancel crosses to the Ray worker: a stream whose client hangs up, and a whole
    answer whose client times out, stop at their next decode step there too."""
    import httpx

    def abandoned() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("eztinker_samples_abandoned_total")
        )

    long = {
        "model": models[0],
        "messages": [{"role": "user", "content": "Go on."}],
        "n": 4,
        "max_tokens": 1024,
        "ignore_eos": True,
    }
    before = abandoned()
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**long, "stream": True}, timeout=60
    ) as response:
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # tokens flow: hang up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=long, timeout=1.0)  # streamed none: watched by polling
    deadline = time.monotonic() + 60
    while abandoned() < before + 2:
        assert time.monotonic() < deadline, "an abandoned sample kept decoding on its worker"
        time.sleep(0.1)


def test_losing_a_worker_fails_its_jobs_brings_its_runs_back_and_replaces_it(client, models):
    doomed, _, _ = trained(client, models[0], seed=7)
    survivor, _, _ = trained(client, models[0], seed=8)
    llama_run, _, _ = trained(client, models[1], seed=9)
    doomed.save_state("ck").result(timeout=60)
    at_checkpoint = score(doomed)
    doomed.forward_backward([EXAMPLE]).result(timeout=60)
    doomed.optim_step(FAST).result(timeout=60)  # step 3: trained past its checkpoint, never saved again
    before = placement(client)
    dead, other = before[doomed.run_id], before[survivor.run_id]
    assert dead != other
    node_of = {
        worker.name: ray.get(
            ray.get_actor(worker.name, namespace="eztinker").__ray_call__.remote(
                lambda self: ray.get_runtime_context().get_node_id()
            )
        )
        for worker in client.health().workers
    }
    assert len(set(node_of.values())) == 2, node_of  # the workers are spread over both nodes

    pending = [doomed.forward_backward(slow_batch(3000)) for _ in range(3)]
    others = [
        (run.forward_backward([EXAMPLE]), run.optim_step(FAST)) for run in (survivor, llama_run) for _ in range(3)
    ]
    deadline = time.monotonic() + 30
    while client.job(pending[0].job_id).status.value != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    ray.kill(ray.get_actor(dead, namespace="eztinker"))

    for future in pending:  # the running job and the queued ones fail, saying why
        with pytest.raises(JobFailedError) as failed:
            future.result(timeout=60)
        assert f"Ray worker {dead}" in failed.value.error and "is gone" in failed.value.error
    assert [opt.result(timeout=60).step for _, opt in others] == [3, 4, 5, 3, 4, 5]  # untouched

    health = client.health()
    assert {w.name: w.alive for w in health.workers}[dead] is False and health.status == "ok"
    assert placement(client)[doomed.run_id] == other
    # Back as its last checkpoint (step 2), on the other worker, and training on.
    assert doomed.info().step == 2 and score(doomed) == pytest.approx(at_checkpoint, abs=1e-5)
    assert doomed.forward_backward([EXAMPLE]).result(timeout=60).loss > 0
    assert doomed.optim_step(FAST).result(timeout=60).step == 3
    # A replacement of the lost worker starts and loads the model (capacity comes back without a
    # restart); a new run goes to it, the live worker holding the fewest runs.
    deadline, replacements = time.monotonic() + 180, []
    while not replacements and time.monotonic() < deadline:
        replacements = [
            w.name for w in client.health().workers if w.alive and w.model == models[0] and w.name not in (dead, other)
        ]
        time.sleep(0.2)
    assert replacements and replacements[0].startswith(dead.split("@")[0] + ".r"), client.health()
    fresh = client.create_training_run(lora_rank=2)
    assert placement(client).get(fresh.run_id) == replacements[0], (fresh.run_id, client.health())
    assert fresh.forward_backward([EXAMPLE]).result(timeout=60).loss > 0


def test_an_unreachable_cluster_is_a_one_line_error(models, tmp_path):
    from eztinker.launcher import free_port

    address = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eztinker.cli",
            "server",
            "--backend",
            "ray",
            "--ray-address",
            address,
            "--model",
            models[0],
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=offline_env(),
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: cannot reach the Ray cluster at {address}: Connection refused"
    )
