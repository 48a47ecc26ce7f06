"""A base model served under another name (`--model NAME=SOURCE`, or a settings file's table), so
that recipes which look models up by Hub name run on a local copy: every API shows the name, and
the Tinker SDK's tokenizer still loads offline, from the folder."""

from __future__ import annotations

import json

import httpx
import pytest

from eztinker.model_spec import served_name, split_model_spec
from eztinker.server.settings import ServerSettings

NAME = "Qwen/Qwen3-4B-Instruct-2507"  # in tinker-cookbook's model table


def test_specs_split_into_a_served_name_and_a_source(tmp_path):
    assert split_model_spec(f"{NAME}=/models/qwen") == (NAME, "/models/qwen")
    assert split_model_spec("Qwen/Qwen2-0.5B-Instruct") == (None, "Qwen/Qwen2-0.5B-Instruct")
    odd = tmp_path / "a=b"  # an existing folder whose name holds '=' is a plain spec
    odd.mkdir()
    assert split_model_spec(str(odd)) == (None, str(odd)) and served_name(str(odd)) == str(odd)
    for bad in ("=/models/qwen", f"{NAME}=", " = "):
        with pytest.raises(ValueError, match="NAME=SOURCE"):
            split_model_spec(bad)


def test_settings_take_names_from_flags_and_from_a_files_table(tmp_path):
    toml = tmp_path / "settings.toml"
    toml.write_text(f'[model]\n"{NAME}" = "/models/qwen"\n"smol" = "smollm2-135m"\n')
    assert ServerSettings.from_file(toml).model == [f"{NAME}=/models/qwen", "smol=smollm2-135m"]
    as_json = tmp_path / "settings.json"
    as_json.write_text(json.dumps({"model": [f"{NAME}=/models/qwen"]}))
    assert ServerSettings.from_file(as_json).model == [f"{NAME}=/models/qwen"]
    with pytest.raises(ValueError, match="served name"):  # two models under one name
        ServerSettings(model=[f"{NAME}=/a", f"{NAME}=/b"])
    with pytest.raises(ValueError, match="NAME=SOURCE"):
        ServerSettings(model=["=/a"])


@pytest.fixture(scope="module")
def named_server(tiny_model_dir, tmp_path_factory):
    from eztinker.launcher import ThreadedServer, build_service

    settings = ServerSettings(
        model=[f"{NAME}={tiny_model_dir}"], device="cpu", data_dir=tmp_path_factory.mktemp("named") / "data"
    )
    with ThreadedServer(build_service(settings)) as server:
        yield server


def test_every_api_shows_the_served_name(named_server, tiny_model_dir):
    info = httpx.get(f"{named_server.url}/v1/info").json()
    assert [m["name"] for m in info["models"]] == [NAME]
    assert NAME in [m["id"] for m in httpx.get(f"{named_server.url}/v1/models").json()["data"]]
    reply = httpx.post(
        f"{named_server.url}/v1/completions",
        timeout=60,
        json={"model": NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0},
    ).json()
    assert reply["model"] == NAME and len(reply["choices"]) == 1
    caps = httpx.get(f"{named_server.url}/api/v1/get_server_capabilities").json()
    assert [m["model_name"] for m in caps["supported_models"]] == [NAME]


def test_the_tinker_sdk_trains_the_named_model_and_loads_its_tokenizer_offline(
    named_server, tiny_model_dir, monkeypatch
):
    tinker = pytest.importorskip("tinker")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub name must not be what the tokenizer loads from
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    service = tinker.ServiceClient(base_url=named_server.url, api_key="tml-named")
    try:
        client = service.create_lora_training_client(base_model=NAME, rank=4).result()
        info = client.get_info()
        assert info.model_data.model_name == NAME
        assert info.model_data.tokenizer_id == str(tiny_model_dir.resolve())
        tokenizer = client.get_tokenizer()
        local = tokenizer.__class__.from_pretrained(tiny_model_dir)
        assert tokenizer.encode("Hello world") == local.encode("Hello world")
        tokens = tokenizer.encode("Hello world")
        datum = tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        assert client.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
        sampler = client.save_weights_and_get_sampling_client().result()
        assert sampler.get_base_model() == NAME
    finally:
        service.close("success").result()
