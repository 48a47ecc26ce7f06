"""The event loop never blocks: `/health` answers quickly while 8 OpenAI streams decode (their
text detokenised in worker threads) and a large Tinker forward_backward body is inflated, decoded
and checked token by token (in worker threads too), on the real server (uvicorn in-process)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import httpx
import numpy as np
import pytest

from eztinker.launcher import ThreadedServer, build_service
from eztinker.server.settings import ServerSettings

pb = pytest.importorskip("tinker.proto.tinker_public_pb2", reason="the Tinker API needs the tinker package")

STREAMS, STREAM_TOKENS = 8, 256
DATUMS, TOKENS = 64, 2048  # 131k tokens, a 2 MB body: checking it takes far longer than 50 ms
# No callback may hold the loop for 50 ms (asyncio's debug mode, below): that is the loop never
# blocking. /health's p99 also counts the interpreter lock, which the worker threads that decode
# and check the body and detokenise the streams share with the loop: on the idle 2-core machine
# it measured under 50 ms on the morning of 2026-12-07 and 57-92 ms that afternoon (same code),
# so the bound on it is 150 ms: a check of the body on the loop would take seconds.
P99_MS = 150
POLL_SECONDS = 0.02
# Past this load average per core the scheduler's delays, not the server, decide a p99 of 50 ms
# (measured: 2 cores under a load of 8 give an idle server a p99 of 12-27 ms, and this test's load
# 60-170 ms). asyncio's debug mode times each callback in wall time, so a loaded machine's
# preemptions show there too (53-205 ms measured at a load of 4-8 per core): under load the test
# asserts only that no callback held the loop for LOADED_SLOW_CALLBACK_SECONDS.
QUIET_LOAD_PER_CORE = 1.0
SLOW_CALLBACK_SECONDS = 0.05
LOADED_SLOW_CALLBACK_SECONDS = 0.5


class _SlowCallbacks(logging.Handler):
    """asyncio debug mode's 'Executing <callback> took 0.123 seconds' warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing") and " took " in message:
            self.messages.append(message)


def _watch_the_loop(server: ThreadedServer, seconds: float) -> _SlowCallbacks:
    """Turn on asyncio's debug mode in the server's loop: every callback that runs longer than
    `seconds` is logged, and collected here."""
    loop = server.server.servers[0].get_loop()
    loop.slow_callback_duration = seconds
    loop.call_soon_threadsafe(loop.set_debug, True)
    handler = _SlowCallbacks()
    logging.getLogger("asyncio").addHandler(handler)
    # The watch itself works: a callback that sleeps past the limit on the loop is caught.
    loop.call_soon_threadsafe(time.sleep, seconds + 0.01)
    deadline = time.monotonic() + 10
    while not handler.messages and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler.messages, f"asyncio's debug mode did not report a {seconds + 0.01:.2f} s callback"
    handler.messages.clear()
    return handler


def _forward_backward_body(model_id: str, seq_id: int, bad_token: int, datums: int = DATUMS) -> bytes:
    """datums x TOKENS tokens whose very last target is `bad_token` (outside the vocabulary): the
    server decodes and checks all of it, then refuses it, so no training runs behind the test."""
    rng = np.random.default_rng(0)
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    for i in range(datums):
        tokens = rng.integers(0, 1000, TOKENS + 1)
        if i == datums - 1:
            tokens[-1] = bad_token
        item = msg.data.add()
        item.model_input.add().encoded_text.tokens = tokens[:-1].astype(np.int32).tobytes()
        for name, values, code in (
            ("target_tokens", tokens[1:].astype(np.int64), pb.DTYPE_INT64),
            ("weights", np.ones(TOKENS, np.float32), pb.DTYPE_FLOAT32),
        ):
            item.loss_fn_inputs[name].dense = values.tobytes()
            item.loss_fn_inputs[name].dtype = code
            item.loss_fn_inputs[name].shape.append(TOKENS)
    return msg.SerializeToString()


def _retrieve(http: httpx.Client, request_id: str) -> dict:
    while (answer := http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()).get(
        "type"
    ) == "try_again":
        pass
    return answer


async def _poll_health(url: str, load: list[threading.Thread]) -> list[float]:
    """Start `load`, and /health every POLL_SECONDS until it is done, each check on its schedule
    whether or not the ones before have been answered (a stall delays every check due during it,
    as it delays every client), with its latency in ms."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(client.get("/health") for _ in range(8)))  # warm connections

        async def check() -> float:
            started = time.perf_counter()
            (await client.get("/health")).raise_for_status()
            return (time.perf_counter() - started) * 1000

        for thread in load:
            thread.start()
        checks, due = [], time.perf_counter()
        while any(thread.is_alive() for thread in load):
            checks.append(asyncio.create_task(check()))
            due += POLL_SECONDS
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
        return list(await asyncio.gather(*checks))


def _load_and_poll(url: str, model: str, model_id: str, vocab: int) -> dict:
    """In a process of its own, so the clients' threads do not take the server's interpreter
    lock: 8 streams and the large body at once, /health polled until they are done."""
    body = _forward_backward_body(model_id, 2, bad_token=vocab)
    texts: list[str] = []
    refused: list[dict] = []

    # Clients made up front: making one (its TLS context) holds this process's lock for ~30 ms.
    shared = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=2 * STREAMS))

    def stream(i: int) -> None:
        request = {
            "model": model,
            "messages": [{"role": "user", "content": f"Tell me story {i}."}],
            "max_tokens": STREAM_TOKENS,
            "stream": True,
            "seed": i,
        }
        with shared.stream("POST", "/v1/chat/completions", json=request) as response:
            texts.append("".join(line for line in response.iter_lines() if line.startswith("data: ")))

    def post_large_body() -> None:
        future = shared.post(
            "/api/v1/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"}
        ).json()
        refused.append(_retrieve(shared, future["request_id"]))

    with shared:
        load = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        load.append(threading.Thread(target=post_large_body))
        latencies = asyncio.run(_poll_health(url, load))
    return {"latencies": latencies, "texts": texts, "refused": refused}


@pytest.fixture()
def one_torch_thread():
    """The engine computes on one core, so the test measures the event loop, not a 2-core
    machine's scheduler: torch's intra-op threads (one per core) would leave the loop no core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_health_p99_stays_under_150_ms_and_no_callback_holds_the_loop_50_ms_while_streams_run(
    tiny_model_dir, tmp_path, one_torch_thread
):
    settings = ServerSettings(data_dir=tmp_path / "data", device="cpu", model=[str(tiny_model_dir)])
    with ThreadedServer(build_service(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        model = server.service.default_model
        session = http.post("/api/v1/create_session", json={}).json()["session_id"]
        created = http.post(
            "/api/v1/create_model",
            json={"session_id": session, "model_seq_id": 0, "base_model": model, "lora_config": {"rank": 1}},
        ).json()
        model_id = _retrieve(http, created["request_id"])["model_id"]
        vocab = server.service.models[model].vocab_size
        # First uses (the chat template's compilation, the protobuf decoder's) are not what is measured.
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 1}
        http.post("/v1/chat/completions", json=chat).raise_for_status()
        warm = _forward_backward_body(model_id, 1, bad_token=vocab, datums=1)
        future = http.post("/api/v1/forward_backward", content=warm, headers={"Content-Type": "application/x-protobuf"})
        assert "outside the vocabulary" in _retrieve(http, future.json()["request_id"])["error"]
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
        quiet = load <= QUIET_LOAD_PER_CORE
        slow = _watch_the_loop(server, SLOW_CALLBACK_SECONDS if quiet else LOADED_SLOW_CALLBACK_SECONDS)
        try:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
                measured = clients.submit(_load_and_poll, server.url, model, model_id, vocab).result(timeout=600)
        finally:
            logging.getLogger("asyncio").removeHandler(slow)

    texts, refused, latencies = measured["texts"], measured["refused"], measured["latencies"]
    assert len(texts) == STREAMS and all(t.endswith("data: [DONE]") for t in texts)
    # The body was decoded and checked to its last token: the refusal names it.
    assert refused and f"data.{DATUMS - 1}.loss_fn_inputs.target_tokens.{TOKENS - 1}" in refused[0]["error"]
    assert len(latencies) >= 50, f"only {len(latencies)} health checks ran while the load did"
    assert not slow.messages, slow.messages  # nothing held the event loop past the limit
    p99 = statistics.quantiles(latencies, n=100)[98]
    worst = sorted(latencies)[-5:]
    summary = f"/health p99 {p99:.1f} ms (median {statistics.median(latencies):.1f}, worst {worst}, n={len(latencies)})"
    if quiet:  # elsewhere other processes' threads, not the server, set the tail
        assert p99 < P99_MS, summary
    print(f"{summary} at a load of {load:.1f} per core")
