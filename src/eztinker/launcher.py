"""Start `eztinker server` as a child process and wait until it answers (the demo, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env() -> dict[str, str]:
    """This process's environment for a server that must neither reach the Hugging Face Hub nor
    pick up the caller's EZTINKER_ settings (tests, benchmarks); EZTINKER_SHARED_DIR is kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EZTINKER_") or k == "EZTINKER_SHARED_DIR"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


class ServerProcess:
    """`python -m eztinker.cli server` in a child process, healthy once constructed.

    Use it as a context manager (stopped on exit, whatever happens) or call `stop()` (SIGTERM, a
    clean shutdown) or `kill()` (SIGKILL, a crash) yourself. Its output goes to `log_file`.
    """

    def __init__(
        self,
        *,
        model: str,
        data_dir: Path,
        log_file: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 600.0,
        poll_interval: float = 0.25,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = Path(log_file)
        command = [sys.executable, "-m", "eztinker.cli", "server", "--model", model, "--data-dir", str(data_dir),
                   "--port", str(self.port), "--log-level", "warning", *extra_args]  # fmt: skip
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"}
            )
        try:
            wait_until_healthy(self.url, self.process, self.log_file, startup_timeout, poll_interval)
        except BaseException:
            self.kill()
            raise

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        """A clean shutdown: SIGTERM, then SIGKILL if it does not exit within `timeout`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown code runs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def wait_until_healthy(
    url: str, process: subprocess.Popen, log_file: Path, timeout: float, poll_interval: float = 0.25
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_file.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"the server exited with code {process.returncode}; its log ({log_file}):\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_interval)
    raise RuntimeError(f"the server at {url} did not become healthy within {timeout:.0f} s; see {log_file}")
