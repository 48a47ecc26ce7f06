"""The tiny test models' trimmed tokenizer (eztinker.tiny.trim_vocabulary) is a real, smaller Qwen2 tokenizer."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from eztinker.tiny import make_tiny_model, qwen2_config_dir, trim_vocabulary

TEXT = "Tom has 15 apples and eats 7. How many are left? 東京 🙂 \\boxed{8}"


def test_a_trimmed_tokenizer_keeps_qwen2s_ids_and_merges_and_moves_only_the_special_tokens(tmp_path):
    full = AutoTokenizer.from_pretrained(qwen2_config_dir())
    trimmed = AutoTokenizer.from_pretrained(trim_vocabulary(qwen2_config_dir(), tmp_path, 4096))

    assert len(trimmed) == 4096 + 3
    ids = trimmed.encode(TEXT)
    assert trimmed.decode(ids) == TEXT and max(ids) < 4096 and len(ids) > len(full.encode(TEXT))
    # Every token of the trimmed vocabulary is Qwen2's token of the same id.
    assert all(full.convert_ids_to_tokens(i) == trimmed.convert_ids_to_tokens(i) for i in ids)
    # Text made only of kept tokens encodes exactly as Qwen2 encodes it.
    common = "it is in the box"
    assert max(full.encode(common)) < 4096 and trimmed.encode(common) == full.encode(common)
    # The special tokens come right after the kept ones, and the chat template uses them.
    assert trimmed.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [4096, 4097, 4098]
    assert trimmed.eos_token_id == 4098
    chat = trimmed.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == full.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"], config["bos_token_id"]) == (4096 + 3 + 64, 4098, 4096)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [4098, 4096]


def test_a_tiny_model_on_a_trimmed_vocabulary_has_a_head_that_size(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m", vocab_size=4096))
    assert model.lm_head.weight.shape[0] == 4096 + 3 + 64
    assert AutoTokenizer.from_pretrained(tmp_path / "m").eos_token_id == model.config.eos_token_id == 4098


def test_a_size_outside_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot trim a BPE vocabulary of 151643 tokens to 200000"):
        trim_vocabulary(qwen2_config_dir(), tmp_path, 200_000)
