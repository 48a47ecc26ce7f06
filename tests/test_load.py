"""Load and memory: concurrent clients against a real server process, run churn, job expiry.

The load itself is bench/load_test.py's (`run_load`), here at a CI size; run that script for the
full 8 runs x 50 pairs figures (docs/reliability.md).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import httpx
import pytest

from eztinker import SamplingParams, ServiceClient

BENCH = Path(__file__).resolve().parents[1] / "bench" / "load_test.py"
_spec = importlib.util.spec_from_file_location("eztinker_load_test", BENCH)
load_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load_test)

# /health must answer within 100 ms; on a loaded 2-core CI machine the p99 is checked against a
# looser bound so the test is not flaky, and the real figures are printed (and documented).
HEALTH_P99_BOUND_S = 0.25


@pytest.fixture()
def server_process(tiny_model_dir, tmp_path):
    with load_test.start_server(str(tiny_model_dir), tmp_path / "data", tmp_path / "server.log") as server:
        yield server


def test_concurrent_clients_every_job_accounted_for(server_process):
    """8 training clients x 10 forward_backward/optim_step pairs, pipelined, plus 2 sampling
    clients, plus /health polled every 20 ms throughout."""
    figures = load_test.run_load(server_process.url, runs=8, pairs=10, samplers=2)
    print(
        f"\nload: {figures['jobs']} jobs in {figures['seconds']} s ({figures['jobs_per_s']} jobs/s); "
        f"/health {figures['health']}; submit {figures['submit']}"
    )
    # run_load has asserted: no error, every job completed, every run at exactly step 10.
    assert figures["job_statuses"] == {"completed": figures["jobs"]}
    assert figures["final_steps"] == [10]
    assert figures["health"]["n"] >= 20, figures["health"]
    assert figures["health"]["p50_ms"] < 100, figures["health"]
    assert figures["health"]["p99_ms"] < HEALTH_P99_BOUND_S * 1000, figures["health"]
    assert figures["submit"]["p99_ms"] < 1000, figures["submit"]  # submission never waits on the queue


def test_memory_stays_bounded_over_200_runs(server_process):
    """200 runs created and deleted (25 alive at a time, some trained and sampled, beside one
    run that lives throughout): the server's RSS ends within a small margin of where it was."""
    url, rss = server_process.url, lambda: load_test.rss_mb(server_process.process.pid)
    with ServiceClient(url, max_retries=0) as client:
        keeper = client.create_training_run(lora_rank=2)

        def cycle(first_seed: int, count: int = 25) -> None:
            runs = [client.create_training_run(lora_rank=8, seed=first_seed + i) for i in range(count)]
            futures = []
            for i, run in enumerate(runs[:5]):
                futures += [run.forward_backward([load_test.example(i)]), run.optim_step(load_test.FAST)]
            futures.append(runs[0].sample([[1, 2, 3]], num_samples=2, sampling_params=SamplingParams(max_tokens=3)))
            for future in futures:
                future.result(timeout=60)
            for run in runs:
                run.delete()

        cycle(0)  # warm-up: allocator pools, kernels, first-use caches
        start = rss()
        trace = []
        for k in range(8):  # 8 x 25 = 200 runs
            cycle(1000 + 25 * k)
            trace.append(round(rss(), 1))
        growth = rss() - start
        print(f"\nRSS {start:.1f} MB -> {trace} MB over 200 runs: {growth:+.1f} MB")
        assert growth < 50, (start, trace)
        assert [r.id for r in client.list_runs()] == [keeper.run_id]
        assert client.health().runs == 1
        assert keeper.forward_backward([load_test.example(0)]).result(timeout=60).num_tokens > 0


def test_finished_jobs_expire_by_age_and_by_count(make_server):
    """Finished jobs (and their results) are kept job_ttl_seconds at most, and each user keeps only
    their newest max_finished_jobs_per_user; the worker expires them at most once a minute, after a job."""
    with (
        make_server(job_ttl_seconds=1, max_finished_jobs_per_user=100) as server,
        ServiceClient(server.url, max_retries=0) as client,
    ):
        runner, store = server.service.runner, server.service.store
        run = client.create_training_run()
        old = run.optim_step()
        old.result(timeout=30)
        time.sleep(1.2)
        runner._last_expiry = 0.0  # due now (instead of a minute after the previous expiry)
        fresh = run.optim_step()
        fresh.result(timeout=30)
        response = httpx.get(f"{server.url}/v1/jobs/{old.job_id}")
        assert response.status_code == 404 and old.job_id in response.json()["detail"]
        assert client.job(fresh.job_id).status.value == "completed"

        futures = [run.optim_step() for _ in range(130)]
        last = futures[-1].result(timeout=60)
        runner._last_expiry = 0.0
        run.optim_step().result(timeout=30)
        # The worker expires after recording the job, so the count drops just after its result is out.
        deadline = time.monotonic() + 10
        while (finished := store.query("SELECT COUNT(*) AS n FROM jobs WHERE finished_at IS NOT NULL")[0]["n"]) > 100:
            assert time.monotonic() < deadline, finished
            time.sleep(0.05)
        assert client.job(futures[-1].job_id).result["step"] == last.step  # the newest are kept
        assert httpx.get(f"{server.url}/v1/jobs/{futures[0].job_id}").status_code == 404
        assert runner._waiters == {}  # no waiter state left behind for finished jobs
        assert run.info().step == 133
