from __future__ import annotations

from pathlib import Path

import pytest

from eztinker.engine import Engine, load_base_model
from eztinker.launcher import ServerProcess, offline_env
from eztinker.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 (hidden 64, 2 layers) with the real Qwen2 tokenizer from ../shared."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir, tmp_path_factory):
    return load_base_model(str(tiny_model_dir), cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")


@pytest.fixture()
def engine(tiny_base):
    engine = Engine(tiny_base)
    yield engine
    for run_id in list(engine._runs):
        engine.delete_run(run_id)


class ThreadedServer:
    """The real ASGI app served by uvicorn on a free loopback port, in a background thread."""

    def __init__(self, service):
        import threading

        import uvicorn

        from eztinker.server.app import create_app

        self.service = service
        config = uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture()
def make_server(tiny_model_dir, tmp_path):
    """make_server(**settings) -> a running server (context manager) over a fresh data dir.

    Each server loads its own copy of the tiny model (0.1 s), as a real server process would:
    an engine's LoRA layers live inside its base model, so servers must not share one.
    """
    from eztinker.server.service import Service
    from eztinker.server.settings import ServerSettings

    def make(data_dir=None, **settings):
        settings = ServerSettings(model=str(tiny_model_dir), data_dir=data_dir or tmp_path / "data", **settings)
        base = load_base_model(settings.model, cache_dir=tmp_path / "cache", device="cpu")
        return ThreadedServer(Service(settings, base))

    return make


@pytest.fixture()
def serve():
    """serve(service) -> a running server (context manager) for a Service built by the test."""
    return ThreadedServer


@pytest.fixture()
def start_server(tiny_model_dir, tmp_path):
    """start_server(data_dir, port) -> a healthy `eztinker server` process on the tiny model;
    all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(data_dir: Path, port: int) -> ServerProcess:
        try:
            server = ServerProcess(
                model=str(tiny_model_dir), data_dir=data_dir, port=port, log_file=tmp_path / f"server-{len(started)}.log",
                extra_args=["--device", "cpu"], env=offline_env(), startup_timeout=120, poll_interval=0.05,
            )
        except RuntimeError as exc:
            pytest.fail(str(exc))
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The shared GSM8K folder. CI always has it, so a test that needs it fails, never skips, without it."""
    import os

    from eztinker.tiny import SHARED_ENV, find_shared_dir

    shared = find_shared_dir() or Path(__file__).resolve().parents[1].parent / "shared"
    path = shared / "data" / "gsm8k"
    if not all((path / f"{split}.jsonl").is_file() for split in ("train", "test")):
        source = f"${SHARED_ENV}" if os.environ.get(SHARED_ENV) else f"../shared beside the project; set ${SHARED_ENV} to look elsewhere"
        pytest.fail(f"GSM8K data not found: looked for train.jsonl and test.jsonl in {path} ({source})", pytrace=False)
    return path
