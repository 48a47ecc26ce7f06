"""What the Ray backend buys and costs, on the tiny Qwen2, side by side in one process.

    python bench/ray_scaling.py [--steps 6] [--positions 512] [--repeats 200]

1. Scaling: 4 runs train concurrently (each submits `--steps` forward_backward + optim_step
   pairs of one `--positions`-token example, all at once, through the SDK) on a server whose Ray
   backend has one worker of one CPU, then on one with two workers of one CPU each (runs spread
   2 + 2). Reported: steps per second of each and their ratio (ideal: 2).
   Beside it, the machine's own parallel headroom (two CPU-bound processes against one, before
   and after): the ratio can be no better, and other processes on the machine lower it.
2. Overhead: a no-op (`execute([])`: the whole call path, no command) and a small
   forward_backward (one 8-token example) on the Ray backend (one worker of one CPU) against the
   local backend in this process on one thread: the backend call alone, and a job's round trip
   through the server (submit, long-poll the result); calls alternate between the two, medians.

A Ray instance of 2 CPUs runs in this process; results: bench/results/ray_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray  # noqa: E402
import torch  # noqa: E402
from run import RESULTS_DIR, log, machine, tiny_model_dir

import eztinker as ez  # noqa: E402
from eztinker.backend.commands import CreateRun, ForwardBackward  # noqa: E402
from eztinker.launcher import ThreadedServer, build_service  # noqa: E402
from eztinker.server.settings import ServerSettings  # noqa: E402

RUNS = 4


def example(positions: int) -> ez.Datum:
    tokens = [(i * 7919) % 150_000 + 10 for i in range(positions + 1)]
    return ez.Datum(
        model_input=ez.ModelInput(tokens=tokens[:-1]),
        loss_fn_inputs=ez.LossFnInputs(target_tokens=tokens[1:], weights=[1.0] * positions),
    )


def service(model: Path, root: Path, name: str, **settings):
    return build_service(ServerSettings(model=[str(model)], data_dir=root / name, device="cpu", **settings))


def ray_service(model: Path, root: Path, name: str, workers: int):
    return service(model, root, name, backend="ray", workers_per_model=[workers], worker_cpus=1)


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
    return {"wall_s": round(wall, 3), "steps_per_s": round(RUNS * steps / wall, 3), "runs_per_worker": placement}


def alternating(calls: dict, repeats: int) -> dict:
    """Median milliseconds of each of `calls` (name -> function), called in turn, so a change in
    the machine's load (other processes) falls on all of them alike."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: round(1e3 * statistics.median(values), 4) for name, values in times.items()}


def overhead(model: Path, root: Path, repeats: int) -> dict:
    torch.set_num_threads(1)  # the local backend on one thread, as a Ray worker of one CPU
    services = {"local": service(model, root, "local"), "ray": ray_service(model, root, "ray-overhead", 1)}
    small = [example(8)]
    execute = {}
    for name, svc in services.items():
        [created] = svc.backend.execute(
            [CreateRun(model=svc.default_model, run_id="bench", lora=ez.LoraConfig(rank=8))]
        )
        assert created.error is None, created.error
        fb = ForwardBackward(model=svc.default_model, run_id="bench", data=small)
        lane = svc.backend.lanes(fb)[0]
        execute[f"{name}_noop"] = lambda b=svc.backend, lane=lane: b.execute([], lane=lane)
        execute[f"{name}_forward_backward"] = lambda b=svc.backend, fb=fb, lane=lane: b.execute([fb], lane=lane)
    results = {"backend_execute_ms": alternating(execute, repeats)}
    # Through the server (the app's lifespan closes each service at the end).
    with ThreadedServer(services["local"]) as local, ThreadedServer(services["ray"]) as on_ray:
        clients = {
            name: ez.ServiceClient(server.url, max_retries=0) for name, server in (("local", local), ("ray", on_ray))
        }
        runs = {name: client.create_training_run(lora_rank=8) for name, client in clients.items()}
        results["forward_backward_job_ms"] = alternating(
            {name: lambda run=run: run.forward_backward(small).result(timeout=60) for name, run in runs.items()},
            repeats,
        )
        for client in clients.values():
            client.close()
    e, j = results["backend_execute_ms"], results["forward_backward_job_ms"]
    results["ray_minus_local_ms"] = {
        "noop_execute": round(e["ray_noop"] - e["local_noop"], 4),
        "forward_backward_execute": round(e["ray_forward_backward"] - e["local_forward_backward"], 4),
        "forward_backward_job": round(j["ray"] - j["local"], 4),
    }
    return results


SPIN = "x = 0\nfor i in range(15_000_000): x += i"


def parallel_headroom() -> float:
    """The machine's own answer to 'do two processes run twice as fast as one?' right now: two
    CPU-bound processes at once against one alone (2.0 on two idle cores; less while other
    processes hold the cores). The scaling ratio can be no better."""

    def wall(n: int) -> float:
        started = time.perf_counter()
        for process in [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]:
            process.wait()
        return time.perf_counter() - started

    return round(2 * wall(1) / wall(2), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="forward_backward + optim_step pairs per run")
    parser.add_argument("--positions", type=int, default=512, help="tokens of the training example")
    parser.add_argument("--repeats", type=int, default=100, help="calls per overhead measure (median)")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    model = tiny_model_dir("tiny")
    root = Path(tempfile.mkdtemp(prefix="eztinker-ray-bench-"))
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, logging_level="error")
    try:
        headroom_before = parallel_headroom()
        log(f"parallel headroom of the machine: {headroom_before}")
        log("4 runs on 1 worker of 1 CPU ...")
        one = throughput(ray_service(model, root, "ray-one", 1), args.steps, args.positions)
        log(f"  {one}")
        log("4 runs on 2 workers of 1 CPU each ...")
        two = throughput(ray_service(model, root, "ray-two", 2), args.steps, args.positions)
        log(f"  {two}")
        headroom_after = parallel_headroom()
        log("round-trip overhead ...")
        costs = overhead(model, root, args.repeats)
        log(f"  {costs}")
    finally:
        ray.shutdown()
    result = {
        "command": "python bench/ray_scaling.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": {**machine(), "load_average_at_end": os.getloadavg()},
        "ray": ray.__version__,
        "scaling": {
            "one_worker": one,
            "two_workers": two,
            "throughput_ratio": round(two["steps_per_s"] / one["steps_per_s"], 2),
            "machine_parallel_headroom_before_after": [headroom_before, headroom_after],
        },
        "overhead": costs,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "ray_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps(result["scaling"], indent=2))


if __name__ == "__main__":
    main()
