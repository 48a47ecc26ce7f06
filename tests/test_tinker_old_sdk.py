"""An older official SDK (default tinker 0.24.1, the oldest this server supports) trains, samples
and checkpoints against a real `eztinker server`, run in its own venv (scripts/old_sdk_venv.sh
builds it; scripts/setup.sh does for CI). `TINKER_OLD_SDK=0.30.4` (after
`scripts/old_sdk_venv.sh 0.30.4`) tests another version the same way."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from eztinker.launcher import ServerProcess, offline_env

ROOT = Path(__file__).resolve().parents[1]
VERSION = os.environ.get("TINKER_OLD_SDK", "0.24.1")
PYTHON = ROOT / f".venv-tinker-{VERSION}" / "bin" / "python"
PROMPT, REPLY = [100, 200, 300], [400, 500, 600, 700]

pytestmark = pytest.mark.skipif(
    not PYTHON.exists(), reason=f"no venv of tinker {VERSION}: run scripts/old_sdk_venv.sh {VERSION} (setup.sh does)"
)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("old-sdk-server")
    with ServerProcess(
        model=str(tiny_model_dir),
        data_dir=root / "data",
        log_file=root / "server.log",
        extra_args=["--device", "cpu"],
        env=offline_env(),
        startup_timeout=300,
        poll_interval=0.05,
    ) as running:
        yield running


def test_an_older_sdk_trains_samples_and_checkpoints(server, tiny_model_dir):
    env = {**offline_env(), "TINKER_TELEMETRY": "0", "PYTHONPATH": ""}
    done = subprocess.run(
        [str(PYTHON), str(ROOT / "tests" / "old_sdk" / "client.py"), server.url, str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["sdk"] == VERSION
    n = len(PROMPT) + len(REPLY) - 1
    # forward (through forward_backward, forward_only): one logprob per position, and it changed nothing.
    assert len(out["forward_logprobs"]) == n
    first_loss = -sum(out["forward_logprobs"][len(PROMPT) - 1 :])
    assert out["losses"][0] == pytest.approx(first_loss, rel=1e-4)
    assert out["losses"][-1] < out["losses"][0]  # it trained
    assert -sum(out["trained_logprobs"][len(PROMPT) - 1 :]) < first_loss
    # The saved state restores to the same weights; the sampler samples them.
    assert out["restored_logprobs"] == pytest.approx(out["trained_logprobs"], abs=1e-4)
    assert [len(s["tokens"]) for s in out["samples"]] == [4, 4]
    assert out["prompt_logprobs"][0] is None
    assert out["prompt_logprobs"][len(PROMPT) :] == pytest.approx(out["trained_logprobs"][len(PROMPT) - 1 :], abs=1e-4)
    assert {"weights/old-sdk", "sampler_weights/old-sdk-sampler"} <= set(out["checkpoints"])
