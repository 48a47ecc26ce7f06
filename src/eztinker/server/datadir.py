"""One server per data directory: an advisory lock (flock) on `<data-dir>/eztinker.lock`, held
for the life of the service.

Two servers on one directory would each take the other's queued jobs for interrupted ones and
write the same checkpoints. The kernel drops the lock when its holder's file is closed, however
the process ends (SIGKILL included), so a killed server never leaves a stale lock behind; the
pid in the file only names the holder in the error.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "eztinker.lock"


class DataDirError(RuntimeError):
    """The data directory cannot be used: another server holds it, or it cannot be created."""


class DataDirLock:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).resolve()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataDirError(f"data directory {self.data_dir} cannot be used: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise DataDirError(
                    f"data directory {self.data_dir} is in use by another EZTinker server "
                    f"(pid {holder}); stop it, or give another --data-dir"
                ) from None
            raise DataDirError(f"data directory {self.data_dir} cannot be locked: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None
