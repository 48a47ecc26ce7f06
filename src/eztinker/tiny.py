"""Tiny random-weight models for tests and benchmarks.

A scaled-down copy of a real config (e.g. Qwen2-0.5B-Instruct: hidden 64, 2 layers) with the real
tokenizer, saved as an ordinary model directory: the server loads it through exactly the code
path that loads the full model from the Hub, chat template and `<|im_end|>` stopping included.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
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
    vocab_size: int | None = None,
) -> Path:
    """Write a random-weight model shaped like `config_dir`'s, but tiny, to `out_dir`.

    `vocab_size` keeps only the tokenizer's first `vocab_size` BPE tokens (see `trim_vocabulary`):
    for tests whose clients copy the tokenizer per example, or that only need a cheap output head.
    """
    config_dir = config_dir or qwen2_config_dir()
    if vocab_size is not None:
        source = _trimmed(config_dir.resolve(), vocab_size)
        return make_tiny_model(out_dir, source, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
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
    copy_tokenizer(config_dir, out_dir)
    generation = config_dir / "generation_config.json"
    if generation.exists():
        (out_dir / "generation_config.json").write_text(generation.read_text())
    return out_dir


TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def copy_tokenizer(config_dir: Path, out_dir: Path) -> None:
    """Copy `config_dir`'s tokenizer files as they are. Re-saving through transformers would write a
    `tokenizer.json`, which transformers 5 parses in Python for Qwen2's tokenizer class: 1.2-1.5 s a
    load against 0.3 s from `vocab.json` and `merges.txt`, paid by every test server."""
    copied = [name for name in TOKENIZER_FILES if (config_dir / name).is_file()]
    if "tokenizer_config.json" not in copied:
        raise FileNotFoundError(f"{config_dir} has no tokenizer_config.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in copied:
        (out_dir / name).write_bytes((config_dir / name).read_bytes())


def trim_vocabulary(config_dir: Path, out_dir: Path, size: int) -> Path:
    """Write `config_dir`'s tokenizer and configs to `out_dir` with only its first `size` BPE
    tokens and its special tokens right after them (the model's vocabulary padded by 64 spare rows).

    Byte-level BPE numbers its tokens in merge order (Qwen2's do), so the kept tokens keep their
    ids and merges: the result is a real, smaller tokenizer that encodes any text, in more tokens.
    """
    tokenizer = AutoTokenizer.from_pretrained(config_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = spec["model"]
    if bpe["type"] != "BPE" or not 256 < size < len(bpe["vocab"]):
        raise ValueError(f"cannot trim a {bpe['type']} vocabulary of {len(bpe['vocab'])} tokens to {size}")
    bpe["vocab"] = {token: i for token, i in bpe["vocab"].items() if i < size}
    merges = bpe["merges"][: size - 256]
    if any(bpe["vocab"].get("".join(_pair(merge))) != 256 + n for n, merge in enumerate(merges)):
        raise ValueError("this tokenizer's ids are not in merge order: it cannot be trimmed by id")
    bpe["merges"] = merges
    moved = {added["id"]: size + n for n, added in enumerate(spec["added_tokens"])}
    for added in spec["added_tokens"]:
        added["id"] = moved[added["id"]]

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    settings = json.loads((out_dir / "tokenizer_config.json").read_text())
    if "added_tokens_decoder" in settings:
        settings["added_tokens_decoder"] = {str(moved[int(k)]): v for k, v in settings["added_tokens_decoder"].items()}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    for name in ("vocab.json", "merges.txt"):  # the slow tokenizer's files would describe the full vocabulary
        (out_dir / name).unlink(missing_ok=True)

    for name in ("config.json", "generation_config.json"):
        if not (config_dir / name).exists():
            continue
        raw = json.loads((config_dir / name).read_text())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(raw.get(key), list):
                raw[key] = [moved.get(i, i) for i in raw[key]]
            elif raw.get(key) is not None:
                raw[key] = moved.get(raw[key], raw[key])
        if name == "config.json":
            raw["vocab_size"] = size + len(moved) + 64
        (out_dir / name).write_text(json.dumps(raw, indent=2))
    return out_dir


_TRIMMED = tempfile.TemporaryDirectory(prefix="eztinker-trimmed-")  # removed when the process exits


@functools.cache
def _trimmed(config_dir: Path, size: int) -> Path:
    """`trim_vocabulary`'s output, made once per process (1.5 s each: tests build several models from one)."""
    return trim_vocabulary(config_dir, Path(tempfile.mkdtemp(dir=_TRIMMED.name)), size)


def _pair(merge: str | list[str]) -> list[str]:
    return merge.split(" ") if isinstance(merge, str) else merge


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
    copy_tokenizer(config_dir, out_dir)
    return out_dir
