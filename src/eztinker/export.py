"""Export a checkpoint from a data directory: its PEFT adapter as is, or merged into its base model
as a plain Hugging Face model folder that `transformers` loads without peft.

Reads `<data-dir>/checkpoints/<run_id>/<name>/` directly: no server is needed, and a running one is
not disturbed (checkpoints are only ever replaced by a rename, so a reader sees a whole one).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from transformers import AutoTokenizer

from .atomic_writes import CheckpointWriteError, write_atomically
from .engine.engine import ADAPTER_WEIGHTS, EngineError, read_training_state
from .engine.models import ModelLoadError, load_base_model, model_source
from .types import parse_checkpoint_ref

ADAPTER_CONFIG = "adapter_config.json"  # peft's name for it
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)


class ExportError(ValueError):
    """The export cannot be done; the message (one line) says why."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    ref: str  # '<run_id>/<name>'
    base_model: str  # the model spec the tokenizer (and, merged, the weights) came from
    merged: bool


def checkpoint_dir(data_dir: Path, ref: str, checkpoints: Path | None = None) -> Path:
    """The folder of checkpoint '<run_id>/<name>' under `checkpoints` (the server's
    --checkpoint-dir; default <data_dir>/checkpoints), checked to hold an adapter."""
    if "/" not in ref:
        raise ExportError(f"checkpoint {ref!r} names no run: expected <run_id>/<checkpoint>")
    try:
        run_id, name = parse_checkpoint_ref(ref, default_run="")
    except ValueError as exc:
        raise ExportError(f"{exc} (expected <run_id>/<checkpoint>)") from None
    directory = Path(checkpoints or Path(data_dir) / "checkpoints") / run_id / name
    if not directory.is_dir():
        raise ExportError(f"checkpoint {run_id}/{name} not found in data directory {data_dir}")
    missing = [f for f in ADAPTER_FILES if not (directory / f).is_file()]
    if missing:
        raise ExportError(f"checkpoint {run_id}/{name} in {data_dir} is incomplete: no {', '.join(missing)}")
    return directory


def export_checkpoint(
    data_dir: Path,
    ref: str,
    out: Path,
    *,
    merge: bool = False,
    model: str | None = None,
    force: bool = False,
    checkpoints: Path | None = None,
) -> ExportResult:
    """Write checkpoint `ref` of `data_dir` to `out` (atomically): the adapter folder, or with
    `merge` the base model with the adapter merged in. `model` overrides the base model the
    checkpoint names (e.g. a local copy of it); `checkpoints`: the server's --checkpoint-dir."""
    data_dir, out = Path(data_dir), Path(out)
    source = checkpoint_dir(data_dir, ref, checkpoints)
    ref = f"{source.parent.name}/{source.name}"
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty (--force replaces it)")
    try:
        spec = model or read_training_state(source)["base_model"]
    except (EngineError, KeyError, TypeError):
        raise ExportError(f"checkpoint {ref} does not name its base model: give one with --model") from None

    cache_dir = data_dir / "cache"
    try:
        if merge:
            base = load_base_model(spec, cache_dir=cache_dir, device="cpu")
            tokenizer = base.tokenizer
        else:
            tokenizer = AutoTokenizer.from_pretrained(model_source(spec, cache_dir=cache_dir))
    except (ModelLoadError, OSError) as exc:
        raise ExportError(
            f"base model {spec!r} of checkpoint {ref} cannot be loaded ({_first_line(exc)}); "
            "give a local copy with --model"
        ) from None

    if merge:
        try:
            if _trains_head(source):
                _untie_output_head(base.model)
            merged = peft.PeftModel.from_pretrained(base.model, source).merge_and_unload()
        except Exception as exc:  # another model's shapes or module names, an unreadable adapter file, ...
            raise ExportError(
                f"checkpoint {ref} cannot be merged into base model {spec!r}: {_first_line(exc)}"
            ) from None

        def write(staging: Path) -> None:
            merged.save_pretrained(staging, safe_serialization=True)  # config + generation config too
            tokenizer.save_pretrained(staging)
    else:

        def write(staging: Path) -> None:
            for name in ADAPTER_FILES:
                shutil.copyfile(source / name, staging / name)
            tokenizer.save_pretrained(staging)

    try:
        write_atomically(out, write)
    except CheckpointWriteError as exc:
        raise ExportError(str(exc).replace("checkpoint", "export", 1)) from None
    except OSError as exc:
        raise ExportError(f"could not write {out}: {exc.strerror or exc}") from None
    return ExportResult(out=out, ref=ref, base_model=spec, merged=merge)


def _trains_head(checkpoint: Path) -> bool:
    try:
        return bool(read_training_state(checkpoint)["lora"].get("train_unembed"))
    except (EngineError, KeyError, TypeError, AttributeError):
        return False


def _untie_output_head(model) -> None:
    """The output head with a weight of its own: merging a LoRA on a head tied to the input
    embeddings (train_unembed) would otherwise write the head's update into the embeddings too.
    The merged model is saved untied (both matrices), and loads as such."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return
    head.weight = torch.nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
    for config in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False


def _first_line(exc: Exception) -> str:
    """A CLI error is one line; ModelLoadError's and torch's messages span several."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
