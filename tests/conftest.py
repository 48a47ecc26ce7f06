from __future__ import annotations

import os
from pathlib import Path

# `make test` runs one pytest-xdist worker per core. torch's default, a thread per core in each
# worker and in each server a test starts, puts several spinning OpenMP threads on every core.
# One thread each (inherited by the servers through the environment) keeps a core per worker.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from support import TINY_BPE_TOKENS

from eztinker.engine import Engine, load_base_model
from eztinker.tiny import make_tiny_model

try:  # the server's side; bench/gpu_check.py runs the engine tests where it is not installed
    from eztinker.launcher import ServerProcess, ThreadedServer, build_service, offline_env
except ImportError:
    pass

# The engine fixtures' device: bench/gpu_check.py runs the engine tests with it set to "cuda".
TEST_DEVICE = os.environ.get("EZTINKER_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 (hidden 64, 2 layers) with the real Qwen2 tokenizer from ../shared, trimmed
    to its first 16k tokens (the special tokens and chat template kept). At hidden size 64 the output
    layer is nearly all of a tiny model's compute: with Qwen2's 151,936 rows a forward and backward
    pass costs about 7 times as much, a decoding step 5 times."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), vocab_size=TINY_BPE_TOKENS)


@pytest.fixture(scope="session")
def full_vocab_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with the whole Qwen2 tokenizer (151,936 rows), for tests of the real vocabulary."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-full"))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir, tmp_path_factory):
    return load_base_model(str(tiny_model_dir), cache_dir=tmp_path_factory.mktemp("cache"), device=TEST_DEVICE)


@pytest.fixture()
def engine(tiny_base):
    engine = Engine(tiny_base)
    yield engine
    for run_id in list(engine._runs):
        engine.delete_run(run_id)


@pytest.fixture()
def make_server(tiny_model_dir, tmp_path):
    """make_server(**settings) -> a running server (context manager) over a fresh data dir.

    Each server loads its own copy of the tiny model (0.1 s), as a real server process would:
    an engine's LoRA layers live inside its base model, so servers must not share one.
    """
    from eztinker.server.settings import ServerSettings

    def make(data_dir=None, **settings):
        settings.setdefault("model", [str(tiny_model_dir)])
        settings = ServerSettings(data_dir=data_dir or tmp_path / "data", device="cpu", **settings)
        return ThreadedServer(build_service(settings))

    return make


@pytest.fixture()
def serve():
    """serve(service) -> a running server (context manager) for a Service built by the test."""
    return ThreadedServer


@pytest.fixture()
def start_server(tiny_model_dir, tmp_path):
    """start_server(data_dir, port, model=..., extra_args=...) -> a healthy `eztinker server`
    process (default: on the tiny model; `model=()` gives no --model flag); all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(data_dir: Path, port: int | None, model=None, extra_args=()) -> ServerProcess:
        try:
            server = ServerProcess(
                model=str(tiny_model_dir) if model is None else model,
                data_dir=data_dir,
                port=port,
                log_file=tmp_path / f"server-{len(started)}.log",
                extra_args=["--device", "cpu", *extra_args],
                env=offline_env(),
                startup_timeout=120,
                poll_interval=0.05,
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
        source = (
            f"${SHARED_ENV}"
            if os.environ.get(SHARED_ENV)
            else f"../shared beside the project; set ${SHARED_ENV} to look elsewhere"
        )
        pytest.fail(f"GSM8K data not found: looked for train.jsonl and test.jsonl in {path} ({source})", pytrace=False)
    return path
