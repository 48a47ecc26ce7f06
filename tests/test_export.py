"""Export, as a user meets it: train a run through the SDK, save a checkpoint, then take it
elsewhere with `eztinker export` (the adapter, or merged into a plain model) or download its
adapter over HTTP, and load each with the stock libraries."""

from __future__ import annotations

import io
import json
import tarfile

import httpx
import peft
import pytest
import torch
from click.testing import CliRunner
from support import train
from transformers import AutoModelForCausalLM, AutoTokenizer

from eztinker import ServiceClient
from eztinker.cli import app

TOKENS = torch.tensor([[100, 200, 300, 400, 500, 600, 700, 42, 7]])  # the trained example and a little more


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def base_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def adapter_logits(tiny_model_dir, adapter_dir) -> torch.Tensor:
    return logits(peft.PeftModel.from_pretrained(base_model(tiny_model_dir), adapter_dir).eval())


@pytest.fixture()
def trained(make_server, tmp_path):
    """(data dir, '<run_id>/<checkpoint>') of a run trained 3 steps; the server has stopped."""
    data_dir = tmp_path / "data"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run(lora_rank=2)
        train(run, 3)
        run.save_state("c1").result(timeout=60)
    return data_dir, f"{run.run_id}/c1"


def export(*args: str):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_merged_export_loads_without_peft_and_gives_the_adapter_models_logits(trained, tiny_model_dir, tmp_path):
    data_dir, ref = trained
    out = tmp_path / "merged"
    result = export(ref, out, "--merge", "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    assert f"exported {ref} merged into {tiny_model_dir}" in result.output

    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files, files
    assert not files & {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "training_state.json"}
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no peft involved
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (
        AutoTokenizer.from_pretrained(out)("hello").input_ids
        == AutoTokenizer.from_pretrained(tiny_model_dir)("hello").input_ids
    )

    merged_logits = logits(merged.eval())
    wanted = adapter_logits(tiny_model_dir, data_dir / "checkpoints" / ref)  # peft on the base, from the checkpoint
    torch.testing.assert_close(merged_logits, wanted, atol=1e-4, rtol=1e-4)
    assert (merged_logits - logits(base_model(tiny_model_dir))).abs().max() > 1e-2  # the training is in it


def test_adapter_export_is_a_peft_folder_with_the_tokenizer(trained, tiny_model_dir, tmp_path):
    data_dir, ref = trained
    out = tmp_path / "adapter"
    result = export(ref, out, "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files, files
    assert not files & {"optimizer.pt", "training_state.json"}
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2

    exported = adapter_logits(tiny_model_dir, out)
    torch.testing.assert_close(exported, adapter_logits(tiny_model_dir, data_dir / "checkpoints" / ref), atol=0, rtol=0)
    assert (exported - logits(base_model(tiny_model_dir))).abs().max() > 1e-2

    # An existing non-empty OUT is refused unless --force, which replaces it whole.
    (out / "stray.txt").write_text("x")
    refused = export(ref, out, "--data-dir", data_dir)
    assert refused.exit_code == 2 and "not empty (--force replaces it)" in refused.output
    assert export(ref, out, "--data-dir", data_dir, "--force").exit_code == 0
    assert not (out / "stray.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_export_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    data_dir = tmp_path / "data"
    for ref, message in [
        (
            "run_0123456789abcdef/nope",
            f"error: checkpoint run_0123456789abcdef/nope not found in data directory {data_dir}",
        ),
        ("../etc", "error: invalid run id '..'"),
        ("just-a-name", "error: checkpoint 'just-a-name' names no run: expected <run_id>/<checkpoint>"),
    ]:
        result = export(ref, tmp_path / "out", "--data-dir", data_dir)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(message) and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists()


def test_rest_adapter_download_is_a_tar_peft_loads_and_only_for_its_owner(make_server, tiny_model_dir, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"key-a": "alice", "key-b": "bob"}))
    with make_server(api_keys_file=keys) as server, ServiceClient(server.url, api_key="key-a", max_retries=0) as alice:
        run = alice.create_training_run()
        train(run, 2)
        run.save_state("c1").result(timeout=60)
        path = f"{server.url}/v1/runs/{run.run_id}/checkpoints/c1/adapter"

        response = httpx.get(path, headers={"Authorization": "Bearer key-a"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/x-tar"
        assert f'filename="{run.run_id}-c1.tar"' in response.headers["content-disposition"]
        with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
            assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint_complete"]
            tar.extractall(tmp_path / "download", filter="data")
        downloaded = adapter_logits(tiny_model_dir, tmp_path / "download")
        on_disk = server.service.checkpoint_root / run.run_id / "c1"
        torch.testing.assert_close(downloaded, adapter_logits(tiny_model_dir, on_disk), atol=0, rtol=0)

        # Bob cannot tell alice's checkpoint from one that does not exist.
        foreign = httpx.get(path, headers={"Authorization": "Bearer key-b"})
        missing = httpx.get(path.replace("/c1/", "/nope/"), headers={"Authorization": "Bearer key-a"})
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json()["detail"] == f"checkpoint {run.run_id}/c1 not found"
        assert httpx.get(path).status_code == 401
