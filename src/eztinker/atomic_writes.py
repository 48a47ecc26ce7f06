"""Directories that appear whole or not at all: checkpoints, exports, the embedded model's cache.

Files are written into a hidden staging directory beside the target, fsynced, and the directory
is renamed into place; leftovers of an interrupted write are removed at start-up. Standard library
only: the server (which never imports torch) and crash tests' child processes use it as well.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

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


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(staging_dir)`, then make the result appear at `target` in one rename."""
    # A run's first save creates checkpoints/<run_id>/; its parent is fsynced so that a power cut
    # cannot lose the new directory's entry, and with it the whole run folder, after the save.
    created = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    if created:
        fsync(target.parent.parent)
    staging = target.parent / f"{_STAGING_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        write(staging)
        for path in staging.iterdir():
            fsync(path)
        fsync(staging)
        if target.exists():  # overwrite: move the old one aside first, drop it after the swap
            retired = target.parent / f"{_RETIRED_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
        fsync(target.parent)
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
                fsync(path.parent)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)  # (a restored one is gone from this path already)
    return leftovers


def fsync(path: Path) -> None:
    """Flush a file's or a directory's entry to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
