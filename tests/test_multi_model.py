"""Several base models in one server: a tiny Qwen2 and a tiny Llama (SmolLM2's architecture) of
another vocabulary, each loaded once; runs of each train, sample, save and load on their own
model, never share a batch, and come back on their own model after a restart."""

from __future__ import annotations

import json

import httpx
import pytest
from support import EXAMPLE, FAST, PROMPT, score, train

from eztinker import APIStatusError, SamplingParams, ServiceClient, datum_from_tokens
from eztinker.backend.commands import Sample, fusable, parse_command
from eztinker.tiny import make_tiny_llama

QWEN_VOCAB, LLAMA_VOCAB = 151_936, 151_646
GREEDY = SamplingParams(max_tokens=5, temperature=0.0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def models(full_vocab_model_dir, llama_dir):
    # Qwen2's whole, padded vocabulary beside the Llama's unpadded one: the per-model checks are the point.
    return [str(full_vocab_model_dir), str(llama_dir)]


def test_two_base_models_serve_their_own_runs(make_server, models):
    qwen, llama = models
    with make_server(model=models) as server, ServiceClient(server.url, max_retries=0) as client:
        assert client.health().models == models
        info = client.info()
        assert [(m["name"], m["architecture"], m["vocab_size"]) for m in info["models"]] == [
            (qwen, "Qwen2ForCausalLM", QWEN_VOCAB),
            (llama, "LlamaForCausalLM", LLAMA_VOCAB),
        ]
        # Each model's weights are loaded once, whatever the number of its runs.
        engines = server.service.backend.engines
        assert list(engines) == models and engines[qwen].base.model is not engines[llama].base.model

        on_qwen = client.create_training_run(lora_rank=2)  # default: the first model
        on_llama = client.create_training_run(lora_rank=2, base_model=llama)
        assert (on_qwen.info().base_model, on_llama.info().base_model) == (qwen, llama)

        response = httpx.post(f"{server.url}/v1/runs", json={"base_model": "Qwen/Qwen2-7B"})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "base_model"]
        assert qwen in response.text and llama in response.text  # it lists the models it holds

        # Vocabulary checks are per model: this id exists in Qwen2's padded vocabulary only.
        beyond_llama = datum_from_tokens(PROMPT, [LLAMA_VOCAB + 5])
        assert on_qwen.forward_backward([beyond_llama]).result(timeout=60).num_tokens == 1
        with pytest.raises(APIStatusError) as err:
            on_llama.forward_backward([beyond_llama])
        assert err.value.status_code == 422 and str(LLAMA_VOCAB) in str(err.value)
        on_qwen.optim_step(FAST).result(timeout=60)

        # Both train: the loss of a trained example falls on each.
        for run in (on_qwen, on_llama):
            losses = [run.forward_backward([EXAMPLE]) for _ in range(1)]
            first = losses[0].result(timeout=60).loss
            train(run, 3)
            assert run.forward_backward([EXAMPLE]).result(timeout=60).loss < first - 0.1
        assert (on_qwen.info().step, on_llama.info().step) == (4, 3)

        # Samples of the two models queued back to back each decode with their own model:
        # the same as each sampled alone.
        alone = {r.run_id: r.sample([PROMPT], sampling_params=GREEDY).result(timeout=60) for r in (on_qwen, on_llama)}
        together = [r.sample([PROMPT], sampling_params=GREEDY) for r in (on_qwen, on_llama, on_qwen, on_llama)]
        for run, future in zip((on_qwen, on_llama, on_qwen, on_llama), together):
            assert future.result(timeout=60).sequences == alone[run.run_id].sequences
        bare = {m: client.sample([PROMPT], sampling_params=GREEDY, base_model=m).result(timeout=60) for m in models}
        assert bare[qwen].sequences != bare[llama].sequences  # two different random models

        # Save and load on each; a checkpoint continues on its own model.
        before = {r.run_id: score(r) for r in (on_qwen, on_llama)}
        for run in (on_qwen, on_llama):
            run.save_state("ckpt").result(timeout=60)
            train(run, 1)
            assert score(run) != pytest.approx(before[run.run_id], rel=1e-6)
            run.load_state("ckpt").result(timeout=60)
            assert score(run) == pytest.approx(before[run.run_id], rel=1e-6)
        copy = client.create_training_run(from_checkpoint=f"{on_llama.run_id}/ckpt")
        assert copy.info().base_model == llama and score(copy) == pytest.approx(before[on_llama.run_id], rel=1e-6)
        with pytest.raises(APIStatusError) as err:
            client.create_training_run(base_model=qwen, from_checkpoint=f"{on_llama.run_id}/ckpt")
        assert err.value.status_code == 422 and "from_checkpoint" in str(err.value)

        tokenizers = {m: client.get_tokenizer(base_model=m) for m in models}
        assert len(tokenizers[qwen]) == len(tokenizers[llama])  # the same tokenizer files, per model


def test_restart_brings_every_run_back_on_its_own_model(make_server, models, tmp_path):
    qwen, llama = models
    data_dir = tmp_path / "data"
    with make_server(model=models, data_dir=data_dir) as server, ServiceClient(server.url) as client:
        runs = {m: client.create_training_run(lora_rank=2, base_model=m) for m in models}
        for run in runs.values():
            train(run, 2)
            run.save_state("two").result(timeout=60)
        scores = {m: score(r) for m, r in runs.items()}

    # Restarted with the models in the other order: every run is back on its own model.
    with make_server(model=[llama, qwen], data_dir=data_dir) as server, ServiceClient(server.url) as client:
        for m, run in runs.items():
            restored = client.training_client(run.run_id)
            info = restored.info()
            assert (info.base_model, info.step, info.restored_from) == (m, 2, f"{run.run_id}/two")
            assert score(restored) == pytest.approx(scores[m], rel=1e-5)
        assert client.create_training_run().info().base_model == llama  # the first given is the default

    # A server without the Llama lists its run but refuses to work on it, saying why.
    with make_server(model=[qwen], data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        assert {r.id for r in client.list_runs()} >= {r.run_id for r in runs.values()}
        with pytest.raises(APIStatusError) as err:
            client.training_client(runs[llama].run_id).optim_step(FAST)
        assert err.value.status_code == 409 and llama in str(err.value)
        assert train(client.training_client(runs[qwen].run_id), 1) == [3]

    with make_server(model=models, data_dir=data_dir) as server, ServiceClient(server.url) as client:
        assert score(client.training_client(runs[llama].run_id)) == pytest.approx(scores[llama], rel=1e-5)


def test_commands_are_data_and_never_fuse_across_models():
    a = Sample(model="a", run_id="run_1", prompts=[[1, 2]], num_samples=2, sampling_params=GREEDY)
    b = a.model_copy(update={"model": "b"})
    assert parse_command(a.model_dump_json()) == a and parse_command(json.loads(b.model_dump_json())) == b
    assert fusable(a, a.model_copy(update={"run_id": None})) and not fusable(a, b)


def test_server_process_takes_models_from_flags_and_a_settings_file(start_server, models, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"model": models, "max_new_tokens": 7}))
    server = start_server(tmp_path / "data", None, model=(), extra_args=["--settings-file", str(settings)])
    with ServiceClient(server.url) as client:
        assert client.health().models == models
        assert client.info()["limits"]["max_new_tokens"] == 7
