"""Start a server and wait until it answers: `eztinker server` as a child process
(`ServerProcess`: the demo, tests, benchmarks) or the same app in a thread of this process
(`ThreadedServer`: tests and benchmarks that reach into the running service)."""

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
        model: str | Sequence[str],
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
        models = [model] if isinstance(model, str) else list(model)
        command = [sys.executable, "-m", "eztinker.cli", "server", *(f"--model={m}" for m in models),
                   "--data-dir", str(data_dir), "--port", str(self.port),
                   "--log-level", "warning", *extra_args]  # fmt: skip
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
    # One client for every poll: each new one loads the CA bundle (about 25 ms of CPU), which the
    # server starting beside it would otherwise share its cores with, 4 times a second.
    with httpx.Client(timeout=2) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_file.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"the server exited with code {process.returncode}; its log ({log_file}):\n{tail}")
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(poll_interval)
    raise RuntimeError(f"the server at {url} did not become healthy within {timeout:.0f} s; see {log_file}")


def build_service(settings, bases=None):
    """The service for `settings` on its backend: local (`bases`, loaded base models, or every
    model the settings name, each loaded once) or Ray (workers started on the cluster). The data
    directory is locked first: a second server on it fails at once (DataDirError), not after
    loading its models."""
    from .server.datadir import DataDirLock
    from .server.service import Service

    lock = DataDirLock(settings.data_dir)
    try:
        return Service(settings, _backend(settings, bases), lock)
    except BaseException:
        lock.release()
        raise


def _backend(settings, bases):
    cache_dir = Path(settings.data_dir).resolve() / "cache"
    if settings.backend == "ray":  # torch loads in the workers only
        from .backend.ray import RayBackend

        return RayBackend.start(
            settings.workers_of(),
            address=settings.ray_address,
            cache_dir=cache_dir,
            device=settings.device[0] if settings.device else None,
            cpus=settings.worker_cpus,
            gpus=settings.worker_gpus,
            engine_options=settings.engine_options(),
        )
    from .backend.local import LocalBackend

    if bases is None:
        return LocalBackend.load(
            settings.model, cache_dir=cache_dir, device=settings.device, **settings.engine_options()
        )
    return LocalBackend(bases, **settings.engine_options())


class ThreadedServer:
    """The real ASGI app served by uvicorn on a free loopback port, in a background thread.

    `with ThreadedServer(service) as server:` -> `server.url`; `server.service` is the live service.
    """

    def __init__(self, service):
        import threading

        import uvicorn

        from .server.app import create_app
        from .server.connections import uvicorn_options

        self.service = service
        config = uvicorn.Config(
            create_app(service), host="127.0.0.1", port=0, log_level="warning", **uvicorn_options(service.settings)
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
