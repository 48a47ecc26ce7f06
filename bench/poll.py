"""One poll of a large finished sample job, served as stored vs decoded and re-encoded, side by side.

    python bench/poll.py [--polls 200]

A job's result is encoded once, by the worker, and `GET /v1/jobs/{id}` splices the stored JSON into
its answer. Before, every poll decoded it, built a `JobInfo` around it and had FastAPI validate and
encode it again (`response_model=JobInfo`). Both are timed here through the same running server
(the real app on uvicorn, httpx on loopback): the old path is the same app with one extra route that
does exactly what the old `GET /v1/jobs/{id}` did. The result is a synthetic sample result of
256 candidates x 64 tokens with logprobs (about 490 KB of JSON). Results: bench/results/poll.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from run import RESULTS_DIR, load, log, machine, tiny_model_dir

from eztinker.launcher import ThreadedServer, build_service
from eztinker.server.settings import ServerSettings
from eztinker.types import JobInfo


def sample_result(candidates: int = 256, tokens: int = 64) -> str:
    rng = random.Random(0)
    sequences = [
        [
            {
                "text": " ".join(str(rng.randrange(1000)) for _ in range(tokens // 2)),
                "tokens": [rng.randrange(150_000) for _ in range(tokens)],
                "logprobs": [-rng.random() * 5 for _ in range(tokens)],
                "stop_reason": "length",
            }
            for _ in range(candidates // 8)
        ]
        for _ in range(8)
    ]
    return json.dumps({"prompt_tokens": [[1, 2, 3]] * 8, "sequences": sequences})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--polls", type=int, default=200)
    args = parser.parse_args()
    base = load("tiny", Path(tempfile.mkdtemp()), tiny_model_dir("tiny"))
    with tempfile.TemporaryDirectory() as tmp:
        service = build_service(ServerSettings(model=[base.name], data_dir=Path(tmp)), [base])
        server = ThreadedServer(service)

        @server.server.config.app.get("/bench/decoded_jobs/{job_id}", response_model=JobInfo)
        def decoded(job_id: str) -> JobInfo:  # the old GET /v1/jobs/{id}
            return service.job("default", job_id).info()

        result = sample_result()
        service.store.add_job("job_bench", "default", None, "sample")
        service.store.mark_finished("job_bench", result=result)
        with server, httpx.Client(base_url=server.url, headers={"Accept-Encoding": "identity"}) as http:
            paths = {"as_stored": "/v1/jobs/job_bench", "decoded_and_reencoded": "/bench/decoded_jobs/job_bench"}
            bodies = {name: http.get(path).json() for name, path in paths.items()}
            assert bodies["as_stored"] == bodies["decoded_and_reencoded"], "the two answers differ"
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.polls):  # interleaved, so both see the same machine load
                for name, path in paths.items():
                    start = time.perf_counter()
                    http.get(path).raise_for_status()
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    ratio = medians["decoded_and_reencoded"] / medians["as_stored"]
    results = {
        "result_bytes": len(result),
        "polls": args.polls,
        "median_ms": medians,
        "p90_ms": {n: statistics.quantiles(t, n=10)[-1] * 1000 for n, t in times.items()},
        "speedup": ratio,
        "machine": machine(),
    }
    log(
        f"poll of a {len(result) / 1000:.0f} KB sample result: as stored {medians['as_stored']:.1f} ms, "
        f"decoded and re-encoded {medians['decoded_and_reencoded']:.1f} ms (median of {args.polls}): {ratio:.1f}x"
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "poll.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
