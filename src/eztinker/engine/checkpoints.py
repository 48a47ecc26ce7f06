"""Atomic checkpoint directories: a crash mid-save never leaves a half-written checkpoint.

Files are written into a hidden staging directory beside the target, fsynced, and the directory
is renamed into place; leftovers of an interrupted save are removed at start-up.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

_STAGING_PREFIX = ".staging-"
_RETIRED_PREFIX = ".retired-"


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(staging_dir)`, then make the result appear at `target` in one rename."""
    # A run's first save creates checkpoints/<run_id>/; its parent is fsynced so that a power cut
    # cannot lose the new directory's entry, and with it the whole run folder, after the save.
    created = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    if created:
        _fsync(target.parent.parent)
    staging = target.parent / f"{_STAGING_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_partial_writes(root: Path) -> list[Path]:
    """Delete staging/retired leftovers below `root` (from a crash mid-save); return them.

    A retired directory whose target is missing is the complete previous checkpoint of an
    overwrite that was interrupted between its two renames: it is moved back, not deleted.
    """
    if not root.exists():
        return []
    leftovers = [
        p for p in root.rglob("*") if p.is_dir() and p.name.startswith((_STAGING_PREFIX, _RETIRED_PREFIX))
    ]
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
