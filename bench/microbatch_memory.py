"""Peak host memory of one training forward_backward on the CPU, for one micro-batch budget: the
embedded SmolLM2-135M in float32, a rank-32 LoRA, 400 sequences of 44 random tokens (the shape of
tinker-cookbook math_rl's default step), on one thread. Run one budget per process (the peak is
the process's high-water mark):

    python bench/microbatch_memory.py 2048

Prints the estimate memory.py makes per token and the measured peak above the loaded model.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from pathlib import Path

import torch

from eztinker.engine import Engine, load_base_model, memory
from eztinker.types import Datum, LoraConfig, LossFnInputs, ModelInput

SEQUENCES, LENGTH = 400, 44


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main() -> None:
    tokens = int(sys.argv[1])
    torch.set_num_threads(1)
    base = load_base_model("smollm2-135m", cache_dir=Path("data/bench-cache"), device="cpu")
    shape = memory.DecoderShape.of(base.model.config)
    estimate = memory.training_bytes_per_token(shape, torch.float32, False)
    engine = Engine(base, microbatch_tokens=tokens)
    engine.warm_up()
    engine.create_run("r", LoraConfig(rank=32))
    rng = random.Random(0)
    data = [
        Datum(
            model_input=ModelInput(tokens=[rng.randrange(1000) for _ in range(LENGTH)]),
            loss_fn_inputs=LossFnInputs(
                target_tokens=[rng.randrange(1000) for _ in range(LENGTH)], weights=[1.0] * LENGTH
            ),
        )
        for _ in range(SEQUENCES)
    ]
    before, started = peak_gb(), time.perf_counter()
    engine.forward_backward("r", data, "cross_entropy")
    above = peak_gb() - before
    print(
        f"micro-batch {tokens} tokens: peak {above:.2f} GB above the loaded model ({above * 1e3 / tokens:.2f} MB a "
        f"token; memory.py estimates {estimate / 1e6:.2f}), {time.perf_counter() - started:.0f} s for "
        f"{SEQUENCES * LENGTH} tokens"
    )


if __name__ == "__main__":
    main()
