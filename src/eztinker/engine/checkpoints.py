"""The checkpoint format (file names, save, read, verify, load) and atomic checkpoint directories.

A checkpoint is a directory: the adapter in PEFT's own format, the optimizer state (optional), and
a small JSON training state. A crash mid-save never leaves a half-written checkpoint: files are
written into a hidden staging directory beside the target, fsynced, and the directory is renamed
into place; leftovers of an interrupted save are removed at start-up.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file

from .errors import EngineError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
TRAINING_STATE = "training_state.json"
_STAGING_PREFIX = ".staging-"
_RETIRED_PREFIX = ".retired-"
_NO_SPACE = "no space left on the device"
_FILE_SIZE_LIMIT = "a file would exceed the process's file-size limit (RLIMIT_FSIZE)"
_ROOM_ERRNOS = {errno.ENOSPC: _NO_SPACE, errno.EDQUOT: "the disk quota is exhausted", errno.EFBIG: _FILE_SIZE_LIMIT}
# Below this much free space a failed write is taken to have filled the disk.
_FULL_DISK_BYTES = 1 << 20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written for lack of room (a full disk, a quota, the file-size
    limit); nothing of it was left behind."""


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


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(staging_dir)`, then make the result appear at `target` in one rename."""
    # A run's first save creates checkpoints/<run_id>/; its parent is fsynced so that a power cut
    # cannot lose the new directory's entry, and with it the whole run folder, after the save.
    created = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    if created:
        _fsync(target.parent.parent)
    staging = target.parent / f"{_STAGING_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        write(staging)
        for path in staging.iterdir():
            _fsync(path)
        _fsync(staging)
        if target.exists():  # overwrite: move the old one aside first, drop it after the swap
            retired = target.parent / f"{_RETIRED_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
        _fsync(target.parent)
    except BaseException as exc:
        reason = _lack_of_room(exc, staging) if isinstance(exc, Exception) else None
        shutil.rmtree(staging, ignore_errors=True)
        if reason is not None:
            raise CheckpointWriteError(
                f"could not write checkpoint {target.parent.name}/{target.name}: {reason}"
            ) from exc
        raise


def _lack_of_room(exc: Exception, staging: Path) -> str | None:
    """Why a failed write ran out of room, or None if it did not. torch.save loses the errno
    ("unexpected pos 576 vs 534") and safetensors keeps it only in its message ("os error 28"),
    so the free space and the file-size limit are checked as well."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _ROOM_ERRNOS:
            return _ROOM_ERRNOS[cause.errno]
        number = next((n for n in _ROOM_ERRNOS if f"os error {n})" in str(cause)), None)
        if number is not None:
            return _ROOM_ERRNOS[number]
        cause = cause.__cause__ or cause.__context__
    stats = os.statvfs(staging.parent)
    if stats.f_bavail * stats.f_frsize < _FULL_DISK_BYTES:
        return _NO_SPACE
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if (
        limit != resource.RLIM_INFINITY
        and staging.is_dir()
        and any(p.stat().st_size >= limit for p in staging.iterdir())
    ):
        return _FILE_SIZE_LIMIT
    return None


def remove_partial_writes(root: Path) -> list[Path]:
    """Delete staging/retired leftovers below `root` (from a crash mid-save); return them.

    A retired directory whose target is missing is the complete previous checkpoint of an
    overwrite that was interrupted between its two renames: it is moved back, not deleted.
    """
    if not root.exists():
        return []
    leftovers = [p for p in root.rglob("*") if p.is_dir() and p.name.startswith((_STAGING_PREFIX, _RETIRED_PREFIX))]
    # A SIGKILL between `rename(target, retired)` and `rename(staging, target)` leaves no `target`;
    # deleting `retired` then would lose the checkpoint the database still lists (the one being
    # overwritten), so roll the overwrite back instead.
    for path in leftovers:
        if path.name.startswith(_RETIRED_PREFIX) and path.exists():
            target = path.parent / path.name[len(_RETIRED_PREFIX) : -9]  # strip "-<8 hex>"
            if path.name[-9] == "-" and target.name and not target.exists():
                os.rename(path, target)
                _fsync(path.parent)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)  # (a restored one is gone from this path already)
    return leftovers


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
