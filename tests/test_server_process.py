"""The real `eztinker server` command in its own process: start it, train through the SDK,
SIGKILL it (mid-job), start it again on the same data directory and port, carry on."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from support import FAST, score, slow_batch, train

from eztinker import ConnectionFailedError, ServiceClient
from eztinker.launcher import free_port, offline_env

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


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
        running = run.forward_backward(slow_batch(2000))
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


def test_a_second_server_on_a_data_dir_in_use_refuses_and_a_killed_ones_lock_does_not_linger(
    start_server, tiny_model_dir, tmp_path
):
    data_dir, port = tmp_path / "data", free_port()
    first = start_server(data_dir, port)
    with ServiceClient(first.url) as service:
        run = service.create_training_run()
        assert train(run, 1) == [1]
        queued = run.forward_backward(slow_batch(200))
        second = [
            sys.executable,
            "-m",
            "eztinker.cli",
            "server",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--data-dir",
            str(data_dir),
            "--port",
            str(free_port()),
        ]
        start = time.monotonic()
        refused = subprocess.run(second, env=offline_env(), capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.splitlines()[-1] == (
            f"error: data directory {data_dir.resolve()} is in use by another EZTinker server "
            f"(pid {first.process.pid}); stop it, or give another --data-dir"
        )
        assert "Traceback" not in refused.stderr and time.monotonic() - start < 15  # before any model (or torch) loads
        # The first server's queued work was not marked interrupted by the second one.
        assert queued.result(timeout=60).loss > 0 and run.info().step == 1

        first.kill()  # SIGKILL: no shutdown code runs, the kernel drops the lock
        restarted = start_server(data_dir, port)
        assert [r.id for r in service.list_runs()] == [run.run_id]
        assert restarted.process.pid != first.process.pid


def test_sigterm_lets_the_running_job_finish_fails_the_queued_ones_at_once_and_exits_within_its_bound(
    start_server, tmp_path
):
    """SIGTERM used to wait ~25 s (held long-polls) while the queue went on running, then leave
    the rest to be failed at the next start. Now: no job starts after the signal, the queued
    ones fail at once as interrupted (their waiters hear it), the running one finishes within
    --shutdown-grace-seconds, and the process exits."""
    import threading

    data_dir, port = tmp_path / "data", free_port()
    server = start_server(data_dir, port, extra_args=["--shutdown-grace-seconds", "60"])
    with ServiceClient(server.url, max_retries=0) as service:
        run = service.create_training_run(lora_rank=2)
        running = run.forward_backward(slow_batch(2000, examples=2))
        queued = [run.optim_step(FAST), run.forward_backward(slow_batch(8)), run.optim_step(FAST)]
        deadline = time.monotonic() + 30
        while service.job(running.job_id).status.value != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        heard: dict[str, str] = {}

        def wait_for(job) -> None:  # a client long-polling its queued job while the server stops
            try:
                job.result(timeout=60)
                heard[job.job_id] = "completed"
            except Exception as exc:  # noqa: BLE001 - what it heard is the point
                heard[job.job_id] = str(exc)

        waiters = [threading.Thread(target=wait_for, args=(job,)) for job in queued]
        for thread in waiters:
            thread.start()
        time.sleep(0.3)
        signalled = time.monotonic()
        server.process.terminate()
        for thread in waiters:
            thread.join(30)
        assert all("interrupted" in heard.get(job.job_id, "") for job in queued), heard
        assert server.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
        took = time.monotonic() - signalled
        assert took < 20, took  # the slow batch's own time, not the 25 s long-polls

    restarted = start_server(data_dir, port)
    with ServiceClient(restarted.url) as service:
        assert service.job(running.job_id).status.value == "completed"  # it finished before the exit
        for job in queued:
            found = service.job(job.job_id)
            assert found.status.value == "failed" and "interrupted" in found.error, found
    assert "queued job(s) failed as interrupted" in server.log()
