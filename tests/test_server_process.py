"""The real `eztinker server` command in its own process: start it, train through the SDK,
SIGKILL it (mid-job), start it again on the same data directory and port, carry on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from eztinker import (
    AdamParams,
    ConnectionFailedError,
    Datum,
    LossFnInputs,
    ModelInput,
    ServiceClient,
    datum_from_tokens,
)

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

FAST = AdamParams(learning_rate=1e-2)
EXAMPLE = datum_from_tokens([100, 200, 300], [400, 500, 600, 700])
START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: Path, data_dir: Path, port: int, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("EZTINKER_") or k == "EZTINKER_SHARED_DIR"}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        command = [
            sys.executable, "-m", "eztinker.cli", "server",
            "--model", str(model_dir),
            "--data-dir", str(data_dir),
            "--port", str(port),
            "--device", "cpu",
            "--log-level", "warning",
        ]  # fmt: skip
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server not healthy after {START_TIMEOUT} s:\n{self.log()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._log.close()


@pytest.fixture()
def start_server(tiny_model_dir, tmp_path):
    """start_server(data_dir, port) -> a healthy `eztinker server` process; all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(data_dir: Path, port: int) -> ServerProcess:
        server = ServerProcess(tiny_model_dir, data_dir, port, tmp_path / f"server-{len(started)}.log")
        started.append(server)
        server.wait_healthy()
        return server

    yield start
    for server in started:
        server.kill()


def slow_batch(positions: int) -> list[Datum]:
    tokens = [(i * 7919) % 150_000 + 10 for i in range(positions + 1)]
    return [
        Datum(
            model_input=ModelInput(tokens=tokens[:-1]),
            loss_fn_inputs=LossFnInputs(target_tokens=tokens[1:], weights=[1.0] * positions),
        )
    ]


def train(run, steps: int) -> list[int]:
    futures = [(run.forward_backward([EXAMPLE]), run.optim_step(FAST)) for _ in range(steps)]
    steps = []
    for fb, opt in futures:
        fb.result(timeout=60)
        steps.append(opt.result(timeout=60).step)
    return steps


def score(run) -> float:
    return run.score([100, 200, 300], ["hello world"]).result(timeout=60).scores[0].sum_logprob


def test_server_survives_sigkill(start_server, tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    first = start_server(data_dir, port)
    with ServiceClient(first.url) as service:
        run = service.create_training_run(lora_rank=2)
        assert train(run, 2) == [1, 2]
        checkpoint = run.save_state("ck").result(timeout=60)
        assert checkpoint.step == 2
        at_checkpoint = score(run)
        assert train(run, 1) == [3]

        # Kill it mid-job, with more work queued behind.
        running = run.forward_backward(slow_batch(800))
        queued = run.optim_step(FAST)
        deadline = time.monotonic() + 30
        while service.job(running.job_id).status.value != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.job(running.job_id).status.value == "running"
        first.kill()
        assert first.process.returncode == -signal.SIGKILL
        with ServiceClient(first.url, max_retries=0) as probe, pytest.raises(ConnectionFailedError):
            probe.health()

        # Same data directory, same port: the same client object carries on.
        second = start_server(data_dir, port)
        [info] = service.list_runs()
        assert info.id == run.run_id
        assert [(c.name, c.step) for c in info.checkpoints] == [("ck", 2)]
        assert (info.step, info.restored_from) == (2, f"{run.run_id}/ck")
        for job_id in (running.job_id, queued.job_id):
            job = service.job(job_id)
            assert job.status.value == "failed" and "interrupted" in job.error, job
        assert run.save_state("after-restart").result(timeout=60).step == 2

        assert score(run) == pytest.approx(at_checkpoint, rel=1e-5)
        assert train(run, 2) == [3, 4]
        assert run.info().step == 4
        assert service.health().runs == 1
    second.kill()
    assert second.process.returncode == -signal.SIGKILL
