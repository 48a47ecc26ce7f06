"""A server shared by several keyed users: retention per user, idempotency that another user's
traffic cannot break, per-user limits and fair scheduling (docs/reliability.md, "Sharing")."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from eztinker import JobFailedError, SamplingParams, ServiceClient

KEYS = {"key-a": "alice", "key-b": "bob"}


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    return path


def _expire_now(server) -> None:
    """Make the worker's next retention pass due (it runs at most once a minute, after a job)."""
    server.service.runner._last_expiry = 0.0


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _finished_jobs(server, owner: str) -> int:
    rows = server.service.store._query("SELECT COUNT(*) AS n FROM jobs WHERE owner = ? AND finished_at IS NOT NULL",
                                       (owner,))
    return rows[0]["n"]


# ------------------------------------------------------------------------------------- retention
def test_another_users_flood_never_makes_a_retry_apply_a_step_twice(make_server, keys_file):
    """Hole 3: finished jobs were evicted by a global count, so user B's traffic evicted user A's
    finished optim_step, and A's retry with the same Idempotency-Key ran it again."""
    with make_server(api_keys_file=keys_file, max_finished_jobs_per_user=100) as server:
        url = server.url
        alice = httpx.Client(base_url=url, headers=_auth("key-a"), timeout=60)
        bob = httpx.Client(base_url=url, headers=_auth("key-b"), timeout=60)
        run = alice.post("/v1/runs", json={"lora": {"rank": 2}}).json()["id"]
        step = {"adam_params": {"learning_rate": 0.01}}
        first = alice.post(f"/v1/runs/{run}/optim_step", json=step, headers={"Idempotency-Key": "step-1"}).json()
        assert alice.get(f"/v1/jobs/{first['job_id']}", params={"wait": 30}).json()["result"]["step"] == 1

        bob_run = bob.post("/v1/runs", json={"lora": {"rank": 2}}).json()["id"]
        jobs = [bob.post(f"/v1/runs/{bob_run}/optim_step", json=step).json()["job_id"] for _ in range(150)]
        bob.get(f"/v1/jobs/{jobs[-1]}", params={"wait": 60})
        _expire_now(server)
        last = bob.post(f"/v1/runs/{bob_run}/optim_step", json=step).json()["job_id"]
        bob.get(f"/v1/jobs/{last}", params={"wait": 30})
        _wait_for(lambda: _finished_jobs(server, "bob") <= 100)  # bob's own cap did apply

        retry = alice.post(f"/v1/runs/{run}/optim_step", json=step, headers={"Idempotency-Key": "step-1"}).json()
        assert retry["job_id"] == first["job_id"]
        assert alice.get(f"/v1/jobs/{first['job_id']}").json()["status"] == "completed"  # alice's job is still there
        assert alice.get(f"/v1/runs/{run}").json()["step"] == 1  # applied once


def test_a_key_outlives_its_expired_job_and_a_large_result_is_dropped_in_time(make_server, keys_file):
    """A user's own traffic evicts their oldest job rows (max_finished_jobs_per_user), but a key
    is remembered idempotency_ttl_seconds regardless: the retry gets the original job id, and the
    step is not applied again. A large result is dropped after large_result_ttl_seconds: the job
    stays completed, saying so, and the SDK raises instead of parsing nothing."""
    with make_server(api_keys_file=keys_file, max_finished_jobs_per_user=100, large_result_bytes=1024,
                     large_result_ttl_seconds=1) as server, ServiceClient(server.url, api_key="key-a",
                                                                           max_retries=0) as client:
        alice = httpx.Client(base_url=server.url, headers=_auth("key-a"), timeout=60)
        run = client.create_training_run(lora_rank=2)
        step = {"adam_params": {"learning_rate": 0.01}}
        first = alice.post(f"/v1/runs/{run.run_id}/optim_step", json=step, headers={"Idempotency-Key": "k"}).json()
        big = run.sample([[1, 2, 3]], num_samples=8, sampling_params=SamplingParams(max_tokens=32, seed=1))
        small = run.sample([[1, 2, 3]], num_samples=1, sampling_params=SamplingParams(max_tokens=1, seed=1))
        assert len(big.result(timeout=60).sequences[0]) == 8
        small.result(timeout=60)
        time.sleep(1.1)
        _expire_now(server)
        run.optim_step().result(timeout=30)
        _wait_for(lambda: client.job(big.job_id).error is not None)
        info = client.job(big.job_id)
        assert info.status.value == "completed" and info.result is None and "no longer kept" in info.error
        assert client.job(small.job_id).result is not None  # small results stay for job_ttl_seconds
        with pytest.raises(JobFailedError, match="no longer kept"):
            type(big)(client, big.job_id, big._parse).result(timeout=5)

        futures = [run.optim_step() for _ in range(120)]
        futures[-1].result(timeout=60)
        _expire_now(server)
        run.optim_step().result(timeout=30)
        _wait_for(lambda: _finished_jobs(server, "alice") <= 100)
        assert alice.get(f"/v1/jobs/{first['job_id']}").status_code == 404  # its row expired...
        retry = alice.post(f"/v1/runs/{run.run_id}/optim_step", json=step, headers={"Idempotency-Key": "k"})
        assert retry.json() == {"job_id": first["job_id"], "status": "completed"}  # ...its key did not
        assert run.info().step == 123
        other = alice.post(f"/v1/runs/{run.run_id}/save", json={"name": "x"}, headers={"Idempotency-Key": "k"})
        assert other.status_code == 409  # a different request under a remembered key


def test_large_results_are_capped_per_user_by_bytes(make_server, keys_file):
    """max_result_bytes_per_user: a user's large results beyond it are dropped, oldest first;
    another user's are untouched."""
    share = 64 * 1024
    with make_server(api_keys_file=keys_file, large_result_bytes=1024, max_result_bytes_per_user=share) as server:
        clients = {k: ServiceClient(server.url, api_key=k, max_retries=0) for k in KEYS}
        runs = {k: c.create_training_run(lora_rank=2) for k, c in clients.items()}
        params = SamplingParams(max_tokens=32, seed=3)
        bob_job = runs["key-b"].sample([[1, 2, 3]], num_samples=16, sampling_params=params)
        bob_job.result(timeout=60)
        alice_jobs = [runs["key-a"].sample([[1, 2, 3]], num_samples=16, sampling_params=params) for _ in range(4)]
        for job in alice_jobs:
            job.result(timeout=60)
        sizes = {row["id"]: row["result_bytes"] for row in server.service.store._query("SELECT id, result_bytes FROM jobs")}
        assert sum(sizes[j.job_id] for j in alice_jobs) > share > sizes[alice_jobs[-1].job_id] > 1024
        _expire_now(server)
        runs["key-a"].optim_step().result(timeout=30)
        _wait_for(lambda: clients["key-a"].job(alice_jobs[0].job_id).error is not None)
        kept = [clients["key-a"].job(j.job_id).result is not None for j in alice_jobs]
        assert kept[-1] and not kept[0]
        assert sum(sizes[j.job_id] for j, k in zip(alice_jobs, kept) if k) <= share
        assert clients["key-b"].job(bob_job.job_id).result is not None
        for client in clients.values():
            client.close()
