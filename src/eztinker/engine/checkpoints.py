"""The checkpoint format (file names, save, read, verify, load) and atomic checkpoint directories.

A checkpoint is a directory: the adapter in PEFT's own format, the optimizer state (optional), and
a small JSON training state, written with `atomic_writes.write_atomically` (a crash mid-save never
leaves a half-written checkpoint).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file

from ..atomic_writes import write_atomically
from .errors import EngineError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
TRAINING_STATE = "training_state.json"


def save(
    directory: Path,
    weights: dict[str, torch.Tensor],
    config: peft.PeftConfig,
    training_state: dict[str, Any],
    optimizer_state: dict[str, Any] | None,
) -> None:
    """Write a checkpoint atomically: the adapter's `weights` and `config` in PEFT's own format, the
    optimizer state if given, and `training_state` (step, LoRA config, base model, whether the
    optimizer state is there)."""

    def write(staging: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / ADAPTER_WEIGHTS)
        config.save_pretrained(str(staging))
        if optimizer_state is not None:
            torch.save(optimizer_state, staging / OPTIMIZER_STATE)
        (staging / TRAINING_STATE).write_text(json.dumps(training_state))

    write_atomically(directory, write)


def load_adapter_weights(model: peft.PeftModel, directory: Path, adapter: str, device: torch.device) -> None:
    """Set `adapter`'s weights on `model` to the checkpoint's. EngineError where the file cannot be
    read, its tensors have other shapes than the adapter's, or some of the adapter's are missing."""
    try:
        weights = load_file(directory / ADAPTER_WEIGHTS, device=str(device))
    except Exception as exc:
        raise EngineError(
            f"checkpoint {ref(directory)}: {ADAPTER_WEIGHTS} cannot be read "
            f"({type(exc).__name__}: {without_path(exc, directory)})"
        ) from None
    try:
        result = peft.set_peft_model_state_dict(model, weights, adapter_name=adapter)
    except RuntimeError as exc:  # tensors of other shapes than its LoRA config's
        raise EngineError(f"checkpoint {ref(directory)} does not match its LoRA config: {exc}") from None
    # torch's _IncompatibleKeys (load_state_dict's result) is a namedtuple mypy cannot see into.
    missing_keys: list[str] = result.missing_keys  # type: ignore[attr-defined]
    missing = [k for k in missing_keys if f".{adapter}." in k and "lora_" in k]
    if missing:
        raise EngineError(f"checkpoint {ref(directory)} is missing {len(missing)} adapter tensors, e.g. {missing[0]}")


def read_optimizer_state(directory: Path) -> dict[str, Any]:
    """weights_only: a checkpoint can never run code on the server."""
    return torch.load(directory / OPTIMIZER_STATE, weights_only=True, map_location="cpu")


def verify_checkpoint(directory: Path) -> None:
    """Read every file of a checkpoint (adapter, optimizer state, training state) without
    applying it; raise EngineError naming the broken file. weights_only: never unpickles code."""
    files: list[tuple[str, Callable[[Path], object]]] = [(ADAPTER_WEIGHTS, lambda path: load_file(path))]
    if read_training_state(directory).get("optimizer", True):  # weights-only checkpoints have none
        files.append((OPTIMIZER_STATE, lambda path: torch.load(path, weights_only=True, map_location="cpu")))
    for name, read in files:
        try:
            read(directory / name)
        except Exception as exc:
            raise EngineError(
                f"checkpoint {ref(directory)} is corrupted or incomplete: {name} cannot be read "
                f"({type(exc).__name__}: {without_path(exc, directory)})"
            ) from None


def stamp(directory: Path) -> tuple:
    """Changes whenever the checkpoint is saved over: a save writes new files (new inodes)."""
    return tuple(
        (s.st_ino, s.st_mtime_ns, s.st_size)
        for s in ((directory / TRAINING_STATE).stat(), (directory / ADAPTER_WEIGHTS).stat())
    )


def read_training_state(directory: Path) -> dict:
    try:
        return json.loads((directory / TRAINING_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"checkpoint {ref(directory)} is not a readable EZTinker checkpoint: "
            f"{TRAINING_STATE}: {without_path(exc, directory)}"
        ) from exc


def ref(directory: Path) -> str:
    """A checkpoint directory's reference, '<run_id>/<name>': errors reach clients, who are not
    to learn the server's paths."""
    return f"{directory.parent.name}/{directory.name}"


def without_path(exc: Exception, directory: Path) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # its filename is the directory's file the message already names
    return str(exc).replace(str(directory), ref(directory))
