"""A backend's torch work runs on its one compute thread, whichever thread asks
(backend/compute_thread.py: libgomp makes a second thread's kernels 1.5-3.6x slower)."""

from __future__ import annotations

import threading

import pytest
from support import EXAMPLE

import eztinker.backend.local as local
from eztinker.backend.commands import CreateRun, ForwardBackward, Sample
from eztinker.backend.compute_thread import ComputeThread
from eztinker.engine import ModelLoadError
from eztinker.types import LoraConfig, SamplingParams


def test_work_runs_on_the_compute_thread_and_its_errors_reach_the_caller():
    compute = ComputeThread(name="test-compute")
    assert compute.run(lambda: threading.current_thread().name) == "test-compute"
    # Called from the compute thread itself (work that hands over more work): run directly, no deadlock.
    assert compute.run(lambda: compute.run(lambda: threading.current_thread().name)) == "test-compute"
    with pytest.raises(KeyError, match="missing"):
        compute.run(lambda: {}["missing"])
    assert compute.run(lambda: 7) == 7  # an error does not stop the thread
    compute.close()
    with pytest.raises(RuntimeError, match="closed"):
        compute.run(lambda: 1)


def test_a_backend_loads_builds_and_executes_on_its_compute_thread(tiny_model_dir, tmp_path, monkeypatch):
    threads: dict[str, str] = {}

    def recorded(name, fn):
        def call(*args, **kwargs):
            threads[name] = threading.current_thread().name
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(local, "load_base_model", recorded("load", local.load_base_model))
    monkeypatch.setattr(local, "Engine", recorded("engine", local.Engine))
    backend = local.LocalBackend.load([str(tiny_model_dir)], cache_dir=tmp_path, device="cpu")
    try:
        [model] = backend.engines
        decoding = []
        commands = [
            CreateRun(model=model, run_id="r", lora=LoraConfig(rank=2)),
            ForwardBackward(model=model, run_id="r", data=[EXAMPLE]),
            Sample(
                model=model,
                run_id="r",
                prompts=[[100, 200]],
                num_samples=2,
                sampling_params=SamplingParams(max_tokens=3, temperature=1.0, seed=0),
            ),
        ]
        caller = threading.Thread(
            target=lambda: decoding.append(
                backend.execute(
                    commands, [None, None, lambda tokens: threads.setdefault("decode", threading.current_thread().name)]
                )
            )
        )
        caller.start()
        caller.join(60)
        assert [outcome.error for outcome in decoding[0]] == [None, None, None]
        assert threads == {"load": "eztinker-compute", "engine": "eztinker-compute", "decode": "eztinker-compute"}
    finally:
        backend.close()
    backend._compute._thread.join(5)
    assert not backend._compute._thread.is_alive()  # closing the backend ends its thread (and its OpenMP team)


def test_a_model_that_fails_to_load_says_so_and_leaves_no_thread(tmp_path, monkeypatch):
    started: list[ComputeThread] = []
    monkeypatch.setattr(local, "ComputeThread", lambda: started.append(ComputeThread()) or started[-1])
    with pytest.raises(ModelLoadError, match="no-such-model"):
        local.LocalBackend.load([str(tmp_path / "no-such-model")], cache_dir=tmp_path, device="cpu")
    started[0]._thread.join(5)
    assert not started[0]._thread.is_alive()
