"""Load test: many concurrent clients against one `eztinker server` process on the tiny model.

    python bench/load_test.py                      # 8 runs x 50 pairs + 2 samplers, writes JSON
    python bench/load_test.py --runs 8 --pairs 10  # the CI-sized version (tests/test_load.py)
    python bench/load_test.py --url http://127.0.0.1:8000   # against a server you started
    python bench/load_test.py --memory-runs 200    # also: RSS while creating/deleting 200 runs

Each training client owns a run and submits `pairs` forward_backward + optim_step pairs back to
back (pipelined, as the SDK allows), then waits for every result; sampling clients sample from
the base model meanwhile; one more thread polls /health every 20 ms throughout. At the end every
submitted job must be accounted for (completed, none lost or failed) and every run's step count
must equal the optim_steps submitted for it. Prints and writes (bench/results/load.json) jobs/s
and p50/p99/max of /health, of job submission, and of sampling round trips.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from eztinker import AdamParams, SamplingParams, ServiceClient, datum_from_tokens
from eztinker.launcher import ServerProcess, offline_env

FAST = AdamParams(learning_rate=1e-3)
RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
    }


def start_server(model: str, data_dir: Path, log_file: Path, extra: list[str] = ()) -> ServerProcess:
    """A server in a child process, offline, with none of the caller's EZTINKER_ settings."""
    return ServerProcess(
        model=model,
        data_dir=data_dir,
        log_file=log_file,
        extra_args=["--device", "cpu", *extra],
        env=offline_env(),
        startup_timeout=180,
    )


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size in MB, from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def example(i: int):
    return datum_from_tokens([100 + i, 200, 300, 17], [400, 500 + i, 600, 700, 11])


def run_load(
    url: str,
    *,
    runs: int = 8,
    pairs: int = 50,
    samplers: int = 2,
    sample_tokens: int = 8,
    health_interval: float = 0.02,
    timeout: float = 600,
) -> dict:
    """Drive the load; return the figures. Raises AssertionError if any job is unaccounted for."""
    stop = threading.Event()
    lock = threading.Lock()
    health_lat: list[float] = []
    health_errors: list[str] = []
    submit_lat: list[float] = []
    sample_lat: list[float] = []
    job_ids: list[str] = []
    errors: list[str] = []
    steps_seen: dict[str, list[int]] = {}
    run_ids: list[str] = []

    def poll_health() -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = http.get("/health")
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:
                        health_errors.append(f"HTTP {response.status_code}")
                    health_lat.append(elapsed)
                except httpx.HTTPError as exc:
                    health_errors.append(repr(exc))
                stop.wait(health_interval)

    def trainer(i: int) -> None:
        try:
            with ServiceClient(url, max_retries=0, timeout=timeout) as client:
                run = client.create_training_run(lora_rank=4, seed=i)
                with lock:
                    run_ids.append(run.run_id)
                futures = []
                for k in range(pairs):
                    for submit in (lambda k=k: run.forward_backward([example(i + k)]), lambda: run.optim_step(FAST)):
                        started = time.perf_counter()
                        future = submit()
                        with lock:
                            submit_lat.append(time.perf_counter() - started)
                            job_ids.append(future.job_id)
                        futures.append(future)
                steps = [f.result(timeout=timeout).step for f in futures[1::2]]
                for f in futures[0::2]:
                    f.result(timeout=timeout)
                steps_seen[run.run_id] = steps
                info = run.info()
                assert info.step == pairs, f"run {run.run_id}: step {info.step}, submitted {pairs}"
        except BaseException as exc:  # reported by the main thread
            errors.append(f"trainer {i}: {type(exc).__name__}: {exc}")

    def sampler(i: int) -> None:
        try:
            with ServiceClient(url, max_retries=0, timeout=timeout) as client:
                params = SamplingParams(max_tokens=sample_tokens, temperature=1.0, seed=i)
                k = 0
                while not trainers_done.is_set() and k < 10_000:
                    started = time.perf_counter()
                    future = client.sample([[100 + i, 200, 300 + k % 50]], num_samples=2, sampling_params=params)
                    with lock:
                        submit_lat.append(time.perf_counter() - started)
                        job_ids.append(future.job_id)
                    result = future.result(timeout=timeout)
                    sample_lat.append(time.perf_counter() - started)
                    assert len(result.sequences[0]) == 2
                    k += 1
        except BaseException as exc:
            errors.append(f"sampler {i}: {type(exc).__name__}: {exc}")

    trainers_done = threading.Event()
    health = threading.Thread(target=poll_health, daemon=True)
    health.start()
    time.sleep(0.2)  # a few idle /health samples first
    started = time.perf_counter()
    threads = [threading.Thread(target=trainer, args=(i,), daemon=True) for i in range(runs)]
    sample_threads = [threading.Thread(target=sampler, args=(i,), daemon=True) for i in range(samplers)]
    for t in threads + sample_threads:
        t.start()
    for t in threads:
        t.join(timeout)
    trainers_done.set()
    for t in sample_threads:
        t.join(timeout)
    elapsed = time.perf_counter() - started
    stop.set()
    health.join(10)

    # Every job accounted for: each submitted id is known to the server and completed.
    statuses: dict[str, int] = {}
    with ServiceClient(url, max_retries=0) as client:
        for job_id in job_ids:
            status = client.job(job_id).status.value
            statuses[status] = statuses.get(status, 0) + 1
        final_steps = {r.id: r.step for r in client.list_runs() if r.id in run_ids}
        for run_id in run_ids:
            client.training_client(run_id).delete()
    expected_jobs = runs * pairs * 2 + len(sample_lat)
    figures = {
        "config": {"runs": runs, "pairs": pairs, "samplers": samplers, "sample_tokens": sample_tokens},
        "seconds": round(elapsed, 2),
        "jobs": len(job_ids),
        "jobs_per_s": round(len(job_ids) / elapsed, 1),
        "train_jobs": runs * pairs * 2,
        "sample_jobs": len(sample_lat),
        "job_statuses": statuses,
        "final_steps": sorted(set(final_steps.values())),
        "health": summary(health_lat),
        "health_errors": health_errors[:5],
        "submit": summary(submit_lat),
        "sample_round_trip": summary(sample_lat),
        "errors": errors[:10],
    }
    assert not errors, errors
    assert not health_errors, health_errors
    assert len(job_ids) == len(set(job_ids)) == expected_jobs, figures
    assert statuses == {"completed": expected_jobs}, figures
    assert len(run_ids) == runs and all(steps == list(range(1, pairs + 1)) for steps in steps_seen.values()), steps_seen
    assert final_steps == {run_id: pairs for run_id in run_ids}, final_steps
    return figures


def churn_runs(url: str, count: int, rss, *, warmup: int = 20, train: bool = True) -> dict:
    """Create (train one step, sample) and delete `count` runs; RSS before/after, in MB."""

    def one(client: ServiceClient, i: int) -> None:
        run = client.create_training_run(lora_rank=8, seed=i)
        if train:
            run.forward_backward([example(i)]).result(timeout=60)
            run.optim_step(FAST).result(timeout=60)
            run.sample([[1, 2, 3]], sampling_params=SamplingParams(max_tokens=2)).result(timeout=60)
        run.delete()

    with ServiceClient(url, max_retries=0) as client:
        for i in range(warmup):
            one(client, i)
        start = rss()
        samples = []
        t0 = time.perf_counter()
        for i in range(count):
            one(client, warmup + i)
            if (i + 1) % max(1, count // 10) == 0:
                samples.append(round(rss(), 1))
        seconds = time.perf_counter() - t0
        assert client.list_runs() == [] and client.health().runs == 0
    end = rss()
    return {
        "runs": count,
        "warmup_runs": warmup,
        "rss_start_mb": round(start, 1),
        "rss_end_mb": round(end, 1),
        "growth_mb": round(end - start, 1),
        "rss_trace_mb": samples,
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (else one is started on a tiny model)")
    parser.add_argument("--model", help="model for the started server (default: a fresh tiny random Qwen2)")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--samplers", type=int, default=2)
    parser.add_argument("--memory-runs", type=int, default=0, help="also churn this many runs and report RSS")
    parser.add_argument("--output", type=Path, default=RESULTS / "load.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = args.url
        if url is None:
            model = args.model
            if model is None:
                from eztinker.tiny import make_tiny_model

                model = str(make_tiny_model(Path(tmp) / "tiny"))
            server = start_server(model, Path(tmp) / "data", Path(tmp) / "server.log")
            url = server.url
        try:
            figures = run_load(url, runs=args.runs, pairs=args.pairs, samplers=args.samplers)
            if args.memory_runs:
                if server is None:
                    parser.error("--memory-runs needs the server started by this script (to read its RSS)")
                figures["memory"] = churn_runs(url, args.memory_runs, lambda: rss_mb(server.process.pid))
        finally:
            if server is not None:
                server.stop()
    figures["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(json.dumps(figures, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
