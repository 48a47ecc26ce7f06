"""Where a backend's torch work runs, side by side: the same small calls (forward_backward of
4 x 32 tokens, optim_step, sampling 4 x 16 tokens; LoRA rank 8) with the model loaded and called

  * same-thread:    on one thread (the main one): the best case, what an in-process benchmark sees;
  * second-thread:  loaded on the main thread, called from a second one: the server before
                    backend/compute_thread.py (it loaded on the main thread, ran jobs on its worker);
  * compute-thread: through `LocalBackend.load` (loads, builds and runs on its compute thread),
                    called from a second thread, as the server's job runner does now.

    python bench/compute_thread.py [--model smollm2|tiny] [--repeats 2] [--calls 8]

Each layout runs in a child process of its own (libgomp's thread teams last as long as the
thread that started them, so layouts cannot share a process), the three alternating, `--repeats`
rounds; the median of each child's steady calls is reported, and the best round per layout counts.
Results: bench/results/compute_thread_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

LAYOUTS = ("same-thread", "second-thread", "compute-thread")
CALLS = ("forward_backward_4x32", "optim_step", "sample_4x16")


def child(layout: str, model: str, cache_dir: Path, calls: int) -> dict:
    import random

    from run import load, tiny_model_dir

    from eztinker.backend.commands import CreateRun, ForwardBackward, OptimStep, Sample
    from eztinker.backend.local import LocalBackend
    from eztinker.engine import Engine, SampleSpec
    from eztinker.types import AdamParams, Datum, LoraConfig, LossFnInputs, ModelInput, SamplingParams

    rng = random.Random(0)
    data = []
    for _ in range(4):
        ids = [rng.randrange(100, 20000) for _ in range(33)]
        data.append(
            Datum(
                model_input=ModelInput(tokens=ids[:-1]),
                loss_fn_inputs=LossFnInputs(target_tokens=ids[1:], weights=[1.0] * 32),
            )
        )
    prompt = [rng.randrange(100, 20000) for _ in range(24)]
    lora, adam = LoraConfig(rank=8, alpha=32.0), AdamParams(learning_rate=1e-4)
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=0)

    if layout == "compute-thread":
        tiny = tiny_model_dir(model)
        backend = LocalBackend.load(
            [str(tiny) if model == "tiny" else "smollm2-135m"], cache_dir=cache_dir, device="cpu"
        )
        name = next(iter(backend.engines))

        def one(command):
            [outcome] = backend.execute([command])
            assert outcome.error is None, outcome.error

        one(CreateRun(model=name, run_id="r", lora=lora))
        work = {
            "forward_backward_4x32": lambda: one(ForwardBackward(model=name, run_id="r", data=data)),
            "optim_step": lambda: one(OptimStep(model=name, run_id="r", adam_params=adam)),
            "sample_4x16": lambda: one(
                Sample(model=name, run_id="r", prompts=[prompt], num_samples=4, sampling_params=params)
            ),
        }
    else:
        engine = Engine(load(model, cache_dir, tiny_model_dir(model)))
        engine.warm_up()  # as the backend does: weights packed before any timed call
        engine.create_run("r", lora)
        work = {
            "forward_backward_4x32": lambda: engine.forward_backward("r", data),
            "optim_step": lambda: engine.optim_step("r", adam),
            "sample_4x16": lambda: engine.sample([SampleSpec("r", [prompt], 4, params)]),
        }

    seconds: dict[str, list[float]] = {name: [] for name in CALLS}

    def measure() -> None:
        for i in range(calls + 1):  # call 0 warms up
            for name in CALLS:
                start = time.perf_counter()
                work[name]()
                if i:
                    seconds[name].append(time.perf_counter() - start)

    if layout == "same-thread":
        measure()
    else:  # a second thread calls, as the server's job runner does
        caller = threading.Thread(target=measure)
        caller.start()
        caller.join()
    return {"median_seconds": {name: statistics.median(values) for name, values in seconds.items()}}


def main() -> None:
    from run import RESULTS_DIR, alternate_in_children, log, machine, side_bench_arguments

    parser = side_bench_arguments(__doc__)
    parser.add_argument("--calls", type=int, default=8, help="steady calls of each kind per child")
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)  # a child's layout
    args = parser.parse_args()
    if args.layout:
        return print(json.dumps(child(args.layout, args.model, args.cache_dir, args.calls)))
    rounds, best = alternate_in_children(__file__, "layout", LAYOUTS, args, CALLS)
    ratios = {
        name: {
            "second_over_compute_thread": best["second-thread"][name] / best["compute-thread"][name],
            "compute_over_same_thread": best["compute-thread"][name] / best["same-thread"][name],
        }
        for name in CALLS
    }
    for name, row in ratios.items():
        log(
            f"{name:22s} second-thread / compute-thread {row['second_over_compute_thread']:.2f}x; "
            f"compute-thread / same-thread {row['compute_over_same_thread']:.2f}x"
        )
    out = RESULTS_DIR / f"compute_thread_{args.model}.json"
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "machine": machine(),
                "rounds": rounds,
                "best": best,
                "ratios": ratios,
                "command": (
                    f"python bench/compute_thread.py --model {args.model} --repeats {args.repeats} --calls {args.calls}"
                ),
            },
            indent=1,
        )
        + "\n"
    )
    log(f"results: {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
