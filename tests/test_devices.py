"""Device placement of base models and the memory-sized micro-batch budget: pure functions of the
visible GPUs and the requests (or of the model's shape and the free memory), checked on the CPU."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoConfig

from eztinker.backend.local import LocalBackend
from eztinker.device_placement import PlacementError, place_models
from eztinker.engine import ModelLoadError, memory
from eztinker.server.settings import ServerSettings
from eztinker.tiny import qwen2_config_dir

MODELS = ["a", "b", "c"]


def test_models_spread_over_the_visible_gpus_without_a_choice():
    assert place_models(MODELS, [], 2) == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:0"}
    assert place_models(MODELS, [], 4) == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:2"}
    assert place_models(MODELS, ["cuda"], 3) == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:2"}
    assert place_models(MODELS, [], 0) == {"a": "cpu", "b": "cpu", "c": "cpu"}


def test_a_model_placed_by_name_and_the_rest_around_it():
    # b takes cuda:0 by name; a and c go to the GPUs holding the fewest models.
    assert place_models(MODELS, ["b=cuda:0"], 2) == {"a": "cuda:1", "b": "cuda:0", "c": "cuda:0"}
    assert place_models(MODELS, ["b=cuda:1", "cpu"], 2) == {"a": "cpu", "b": "cuda:1", "c": "cpu"}
    assert place_models(["org/m=x"], ["org/m=x=cuda:1"], 2) == {"org/m=x": "cuda:1"}  # the last '=' splits


def test_plain_devices_apply_to_every_model_or_one_per_model_in_order():
    assert place_models(MODELS, ["cpu"], 2) == dict.fromkeys(MODELS, "cpu")
    assert place_models(MODELS, ["cuda:1"], 2) == dict.fromkeys(MODELS, "cuda:1")
    assert place_models(MODELS, ["cuda:1", "cpu", "cuda"], 2) == {"a": "cuda:1", "b": "cpu", "c": "cuda:0"}


@pytest.mark.parametrize(
    "entries, gpus, message",
    [
        (["cuda:2"], 2, "cuda:2 is not visible"),
        (["cuda"], 0, "no GPU is visible"),
        (["gpu0"], 1, "'gpu0': a device is"),
        (["z=cpu"], 1, "'z=cpu' names no --model"),
        (["a=cpu", "a=cuda:0"], 1, "two devices for 'a'"),
        (["cpu", "cpu"], 1, "got 2 plain device(s) for 3 model(s)"),
    ],
)
def test_impossible_requests_are_refused_naming_the_entry(entries, gpus, message):
    with pytest.raises(PlacementError) as err:
        place_models(MODELS, entries, gpus)
    assert message in str(err.value)


def test_settings_check_the_device_entries_before_loading(tmp_path):
    settings = ServerSettings(data_dir=tmp_path, model=["a", "b"], device="a=cuda:1,cpu", microbatch_tokens=4096)
    assert settings.device == ["a=cuda:1", "cpu"]
    assert settings.engine_options() == {"microbatch_tokens": 4096, "activation_checkpointing": None}
    with pytest.raises(ValidationError, match="names no --model"):
        ServerSettings(data_dir=tmp_path, model=["a"], device=["b=cuda:0"])
    with pytest.raises(ValidationError, match="--backend ray: one device"):
        ServerSettings(data_dir=tmp_path, model=["a"], device=["cuda:1"], backend="ray")


def test_a_gpu_asked_for_on_a_machine_without_one_is_a_load_error(tiny_model_dir, tmp_path):
    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="--device: .*no GPU is visible"):
        LocalBackend.load([str(tiny_model_dir)], cache_dir=tmp_path, device=["cuda"])
    backend = LocalBackend.load([str(tiny_model_dir)], cache_dir=tmp_path, device=[], microbatch_tokens=1024)
    try:
        [engine] = backend.engines.values()
        assert engine.base.device.type == "cpu" and engine.microbatch_tokens == 1024
        assert engine.activation_checkpointing is False  # it would only cost time on the CPU
    finally:
        backend.close()


QWEN2 = {  # public configs: hidden, intermediate, layers, attention heads, kv heads
    "0.5b": (896, 4864, 24, 14, 2),
    "1.5b": (1536, 8960, 28, 12, 2),
    "7b": (3584, 18944, 28, 28, 4),
}


def _shape(name: str) -> memory.DecoderShape:
    hidden, intermediate, layers, heads, kv = QWEN2[name]
    return memory.DecoderShape(layers, hidden, intermediate, kv * hidden // heads)


def test_the_micro_batch_budget_grows_with_free_memory_and_checkpointing():
    shape, bf16 = _shape("7b"), torch.bfloat16
    plain, checkpointed = (memory.training_bytes_per_token(shape, bf16, c) for c in (False, True))
    assert checkpointed < plain / 5  # one layer's activations and every layer's input, not all of them
    gib = 1 << 30
    # 7B in bf16 on an 80 GB GPU: ~64 GiB free after its 15 GiB of weights.
    without, with_ = (memory.microbatch_token_budget(64 * gib, b) for b in (plain, checkpointed))
    assert 4096 <= without < 8192 < with_ <= memory.MAX_MICROBATCH_TOKENS  # 8192 tokens fit only checkpointed
    assert without * plain <= memory.FREE_MEMORY_SHARE * 64 * gib
    assert memory.microbatch_token_budget(1 * gib, plain) == memory.MIN_MICROBATCH_TOKENS
    assert memory.microbatch_token_budget(10**15, checkpointed) == memory.MAX_MICROBATCH_TOKENS
    small = memory.training_bytes_per_token(_shape("0.5b"), bf16, False)
    assert memory.microbatch_token_budget(64 * gib, small) > without


def test_the_decoder_shape_is_read_from_a_config():
    config = AutoConfig.from_pretrained(qwen2_config_dir())
    assert memory.DecoderShape.of(config) == _shape("0.5b")
    assert memory.default_microbatch_tokens(config, torch.bfloat16, torch.device("cpu"), True) == 8192


def test_the_cpu_budget_follows_the_hosts_available_memory(monkeypatch):
    config = AutoConfig.from_pretrained(qwen2_config_dir())
    fp32, cpu = torch.float32, torch.device("cpu")
    per_token = memory.training_bytes_per_token(memory.DecoderShape.of(config), fp32, False)
    assert memory.host_available_memory() > 0  # Linux's MemAvailable, read for real
    gib = 1 << 30
    monkeypatch.setattr(memory, "host_available_memory", lambda: 4 * gib)
    tokens = memory.default_microbatch_tokens(config, fp32, cpu, False)
    assert memory.MIN_MICROBATCH_TOKENS <= tokens < memory.CPU_MICROBATCH_TOKENS
    assert tokens * per_token * memory.CPU_ESTIMATE_MARGIN <= memory.FREE_MEMORY_SHARE * 4 * gib
    monkeypatch.setattr(memory, "host_available_memory", lambda: 1000 * gib)
    assert memory.default_microbatch_tokens(config, fp32, cpu, False) == memory.CPU_MICROBATCH_TOKENS
    monkeypatch.setattr(memory, "host_available_memory", lambda: None)  # a host that does not say
    assert memory.default_microbatch_tokens(config, fp32, cpu, False) == memory.CPU_MICROBATCH_TOKENS
