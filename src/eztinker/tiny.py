"""Tiny random-weight models for tests and benchmarks.

A scaled-down copy of a real config (e.g. Qwen2-0.5B-Instruct: hidden 64, 2 layers) with the real
tokenizer, saved as an ordinary model directory: the server loads it through exactly the code
path that loads the full model from the Hub, chat template and `<|im_end|>` stopping included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

SHARED_ENV = "EZTINKER_SHARED_DIR"
QWEN2_CONFIG = Path("models") / "qwen2-0.5b-instruct-config"


def find_shared_dir() -> Path | None:
    """`$EZTINKER_SHARED_DIR`, else `../shared` beside the project root, else None."""
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV])
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").exists():
            candidate = parent.parent / "shared"
            return candidate if candidate.is_dir() else None
    return None


def qwen2_config_dir() -> Path:
    shared = find_shared_dir()
    path = shared / QWEN2_CONFIG if shared else None
    if path is None or not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the Qwen2 tokenizer/config folder was not found (looked for {QWEN2_CONFIG} under "
            f"{shared or '../shared'}); set {SHARED_ENV} to the folder that holds `models/`"
        )
    return path


def make_tiny_model(
    out_dir: Path,
    config_dir: Path | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random-weight model shaped like `config_dir`'s, but tiny, to `out_dir`."""
    config_dir = config_dir or qwen2_config_dir()
    raw = json.loads((config_dir / "config.json").read_text())
    heads = 4
    raw.update(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        max_window_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
    )
    raw.pop("torch_dtype", None)
    config = AutoConfig.for_model(**raw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out_dir)
    generation = config_dir / "generation_config.json"
    if generation.exists():
        (out_dir / "generation_config.json").write_text(generation.read_text())
    return out_dir


def make_tiny_llama(
    out_dir: Path, config_dir: Path | None = None, *, hidden_size: int = 48, num_layers: int = 3, seed: int = 1
) -> Path:
    """A random-weight Llama (SmolLM2's architecture: tied embeddings, no attention bias), tiny,
    with the real Qwen2 tokenizer and its chat template; its vocabulary is the tokenizer's own
    length, so it differs from the tiny Qwen2's padded one."""
    config_dir = config_dir or qwen2_config_dir()
    tokenizer = AutoTokenizer.from_pretrained(config_dir)
    qwen = json.loads((config_dir / "config.json").read_text())
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=qwen.get("bos_token_id"),
        eos_token_id=qwen.get("eos_token_id"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
