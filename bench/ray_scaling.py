"""What the Ray backend buys and costs, on the tiny Qwen2, side by side in one process.

    python bench/ray_scaling.py [--steps 6] [--positions 512] [--repeats 200]

1. Scaling: 4 runs train concurrently (each submits `--steps` forward_backward + optim_step
   pairs of one `--positions`-token example, all at once, through the SDK) on a server whose Ray
   backend has one worker of one CPU, then on one with two workers of one CPU each (runs spread
   2 + 2). Reported: steps per second of each and their ratio (ideal: 2).
2. Overhead: a no-op (`execute([])`: the whole call path, no command) and a small
   forward_backward (one 8-token example) on the Ray backend (one worker of one CPU) against the
   local backend in this process on one thread: the backend call alone, and a job's round trip
   through the server (submit, long-poll the result).

A Ray instance of 2 CPUs runs in this process; results: bench/results/ray_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from run import RESULTS_DIR, log, machine, tiny_model_dir

import ray  # noqa: E402
import torch  # noqa: E402

import eztinker as ez  # noqa: E402
from eztinker.backend.commands import ForwardBackward  # noqa: E402
from eztinker.launcher import ThreadedServer, build_service  # noqa: E402
from eztinker.server.settings import ServerSettings  # noqa: E402

RUNS = 4


def example(positions: int) -> ez.Datum:
    tokens = [(i * 7919) % 150_000 + 10 for i in range(positions + 1)]
    return ez.Datum(model_input=ez.ModelInput(tokens=tokens[:-1]),
                    loss_fn_inputs=ez.LossFnInputs(target_tokens=tokens[1:], weights=[1.0] * positions))


def service(model: Path, root: Path, name: str, **settings):
    return build_service(ServerSettings(model=[str(model)], data_dir=root / name, device="cpu", **settings))


def ray_service(model: Path, root: Path, workers: int):
    return service(model, root, f"ray-{workers}", backend="ray", workers_per_model=[workers], worker_cpus=1)


def throughput(svc, steps: int, positions: int) -> dict:
    datum, params = example(positions), ez.AdamParams(learning_rate=1e-3)
    with ThreadedServer(svc) as server, ez.ServiceClient(server.url, max_retries=0) as client:
        runs = [client.create_training_run(lora_rank=8, seed=i) for i in range(RUNS)]
        for run in runs:  # warm-up: first-call costs out of the timing
            run.forward_backward([datum]).result(timeout=600)
        placement = {w.name: len(w.runs) for w in client.health().workers}
        started = time.perf_counter()
        futures = [(run.forward_backward([datum]), run.optim_step(params)) for _ in range(steps) for run in runs]
        for fb, opt in futures:
            fb.result(timeout=600), opt.result(timeout=600)
        wall = time.perf_counter() - started
    svc.close()
    return {"wall_s": round(wall, 3), "steps_per_s": round(RUNS * steps / wall, 3), "runs_per_worker": placement}


def backend_latency(backend, commands, repeats: int) -> float:
    """Median seconds of `backend.execute(commands)`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        [outcome.error for outcome in backend.execute(commands)]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def job_latency(svc, data, repeats: int) -> dict:
    """Median seconds of a job's round trip through the server: a forward_backward submitted and waited for."""
    with ThreadedServer(svc) as server, ez.ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run(lora_rank=8)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run.forward_backward(data).result(timeout=60)
            times.append(time.perf_counter() - started)
        run_id = run.run_id
    return {"median_s": statistics.median(times), "run_id": run_id}


def overhead(model: Path, root: Path, repeats: int) -> dict:
    torch.set_num_threads(1)  # the local backend on one thread, as a Ray worker of one CPU
    local, on_ray = service(model, root, "local"), ray_service(model, root, 1)
    small = [example(8)]
    results = {}
    try:
        for name, svc in (("local", local), ("ray", on_ray)):
            job = job_latency(svc, small, repeats)
            fb = ForwardBackward(model=svc.default_model, run_id=job["run_id"], data=small)
            results[name] = {
                "noop_execute_ms": 1e3 * backend_latency(svc.backend, [], repeats),
                "small_forward_backward_execute_ms": 1e3 * backend_latency(svc.backend, [fb], repeats),
                "small_forward_backward_job_ms": 1e3 * job["median_s"],
            }
    finally:
        local.close(), on_ray.close()
    results["ray_minus_local_ms"] = {k: results["ray"][k] - results["local"][k] for k in results["local"]}
    for side in ("local", "ray", "ray_minus_local_ms"):
        results[side] = {k: round(v, 3) for k, v in results[side].items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="forward_backward + optim_step pairs per run")
    parser.add_argument("--positions", type=int, default=512, help="tokens of the training example")
    parser.add_argument("--repeats", type=int, default=200, help="calls per overhead measure (median)")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    model = tiny_model_dir("tiny")
    root = Path(tempfile.mkdtemp(prefix="eztinker-ray-bench-"))
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, logging_level="error")
    try:
        log("4 runs on 1 worker of 1 CPU ...")
        one = throughput(ray_service(model, root, 1), args.steps, args.positions)
        log(f"  {one}")
        log("4 runs on 2 workers of 1 CPU each ...")
        two = throughput(ray_service(model, root, 2), args.steps, args.positions)
        log(f"  {two}")
        log("round-trip overhead ...")
        costs = overhead(model, root, args.repeats)
        log(f"  {costs}")
    finally:
        ray.shutdown()
    result = {
        "command": "python bench/ray_scaling.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": {**machine(), "load_average_at_end": os.getloadavg()},
        "ray": ray.__version__,
        "scaling": {"one_worker": one, "two_workers": two,
                    "throughput_ratio": round(two["steps_per_s"] / one["steps_per_s"], 2)},
        "overhead": costs,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "ray_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps(result["scaling"], indent=2))


if __name__ == "__main__":
    main()
