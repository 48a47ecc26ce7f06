"""Fuzz the HTTP API from its own OpenAPI schema with schemathesis (valid and invalid requests).

Every response must be a non-5xx; every rejection a 4xx in its protocol's error shape that names
the problem (REST: a JSON `detail`, a message or for 422 a list of {loc, msg} naming each
offending field; Tinker, under /api/v1/: `{"error", "category"}`; OpenAI: `{"error": {"message"}}`);
every 2xx must match the response schema; and the server must still answer and train afterwards.

CI runs FUZZ_EXAMPLES (default 15) examples per operation and generation mode, over every
operation of the three protocols (1,380 requests over 62 operations); for thousands:

    FUZZ_EXAMPLES=300 python -m pytest tests/test_fuzz.py -q -s
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from eztinker import AdamParams, SamplingParams, ServiceClient, datum_from_tokens
from eztinker.server.openai.router import owns as is_openai_path

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))
# Tight limits keep every accepted job cheap (the queue drains quickly) and make the limits
# themselves part of what is fuzzed.
LIMITS = dict(
    max_new_tokens=4, max_prompt_tokens=64, max_batch_examples=4, max_samples_per_request=4, max_request_bytes=64 * 1024
)


def describe_problem(response, path: str) -> None:
    """A 4xx must say what is wrong, in the shape of the protocol it came through."""
    body = response.json()
    if path.startswith("/api/v1/"):  # Tinker
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and len(body["error"]) > 8, body
        assert body.get("category") in ("user", "server"), body
        return
    if is_openai_path(path):
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict) and isinstance(error.get("message"), str) and len(error["message"]) > 8, body
        return
    detail = body.get("detail") if isinstance(body, dict) else None
    assert detail, f"{response.status_code} without a detail: {response.text[:500]}"
    if isinstance(detail, list):
        for item in detail:
            assert item.get("msg") and item.get("loc"), f"a 422 item without loc/msg: {item}"
    else:
        assert isinstance(detail, str) and len(detail) > 8, detail


def test_fuzz_the_api_from_its_openapi_schema(make_server):
    schemathesis = pytest.importorskip("schemathesis")  # the `test` extra; the tests below need none
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import response_schema_conformance

    with make_server(**LIMITS) as server, ServiceClient(server.url, max_retries=0) as client:
        url = server.url
        # Real ids to aim at, besides the random ones the schema yields (which are mostly 404s).
        keeper = client.create_training_run(lora_rank=2)
        keeper.forward_backward([datum_from_tokens([1, 2, 3], [4, 5])]).result(timeout=60)
        keeper.optim_step(AdamParams(learning_rate=1e-3)).result(timeout=60)
        done_job = keeper.save_state("c1")
        done_job.result(timeout=60)
        real = {"run_id": keeper.run_id, "job_id": done_job.job_id}

        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")  # the server's own schema
        counts: dict[str, int] = {}
        skipped: list[str] = []
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15, [op.label for op in operations]

        def fuzz_test(operation, mode):  # a factory: closures in the loop would see its last values
            @given(
                case=operation.as_strategy(generation_mode=mode),
                aim=st.booleans(),
                checkpoint=st.sampled_from([None, "c1", f"{keeper.run_id}/c1", "../c1", "/etc"]),
            )
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case, aim, checkpoint):
                if aim and case.path_parameters:
                    for name in case.path_parameters:
                        if name == "run_id" and case.method.upper() == "DELETE":
                            case.path_parameters[name] = client.create_training_run().run_id
                        elif name in real:
                            case.path_parameters[name] = real[name]
                if checkpoint is not None and isinstance(case.body, dict):
                    for key in ("checkpoint", "from_checkpoint"):
                        if key in case.body:
                            case.body[key] = checkpoint
                if isinstance(case.query, dict) and "wait" in case.query:
                    case.query["wait"] = (
                        min(case.query["wait"], 1)
                        if isinstance(case.query["wait"], (int, float))
                        else case.query["wait"]
                    )
                response = case.call(base_url=url, timeout=120)
                counts[operation.label] = counts.get(operation.label, 0) + 1
                assert response.status_code < 500, (
                    f"{response.status_code} on {case.method} {case.formatted_path}: {response.text[:1000]}\n"
                    f"{case.as_curl_command()}"
                )
                if 400 <= response.status_code < 500:
                    describe_problem(response, operation.path)
                else:
                    case.validate_response(response, checks=[response_schema_conformance])

            return fuzz

        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz = fuzz_test(operation, mode)
                try:
                    fuzz()
                except Unsatisfiable:  # nothing to negate (e.g. GET /health has no input)
                    assert mode is GenerationMode.NEGATIVE, operation.label
                    skipped.append(operation.label)

        total = sum(counts.values())
        print(
            f"\nfuzz: {total} requests over {len(counts)} operations, none 5xx "
            f"(nothing to negate in: {', '.join(skipped) or 'none'})"
        )
        # The server is still up, and a run still trains and samples.
        assert client.health().status == "ok"
        assert keeper.forward_backward([datum_from_tokens([1, 2, 3], [4, 5])]).result(timeout=120).num_tokens == 2
        fresh = client.create_training_run(lora_rank=2)
        assert fresh.optim_step().result(timeout=120).step == 1
        sampled = fresh.sample([[1, 2, 3]], sampling_params=SamplingParams(max_tokens=2)).result(timeout=120)
        assert len(sampled.sequences[0]) == 1
        deadline = time.monotonic() + 120
        while server.service.runner.queued and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.service.runner._waiters == {}  # nothing left waiting


# ------------------------------------------------------------------- hand-picked bad input
# What the schema-driven fuzzing above does not generate: inputs that, unhandled, would be a 500
# or break the server for every run, not just the caller's.
def _post(url: str, path: str, raw: str):
    return httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)


def _assert_422_at(response, loc: tuple) -> None:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    locs = [tuple(item["loc"]) for item in detail]
    assert any(found[: len(loc)] == loc for found in locs), (loc, locs)
    assert all(item["msg"] for item in detail)


def test_lone_surrogates_and_huge_seeds_are_422_not_500(make_server):
    """JSON may carry "\\ud800" (a lone UTF-16 surrogate) and integers of any size."""
    with make_server(**LIMITS) as server, ServiceClient(server.url, max_retries=0) as client:
        url, run = server.url, client.create_training_run()
        base = f"/v1/runs/{run.run_id}"
        bad = "\\ud800"
        cases = [
            (f"{base}/evaluate", f'{{"prompt": {{"text": "hi"}}, "responses": ["{bad}"]}}', ("body", "responses", 0)),
            (f"{base}/evaluate", f'{{"prompt": {{"text": "x{bad}"}}, "responses": ["a"]}}', ("body", "prompt")),
            (
                f"{base}/sample",
                f'{{"prompts": [{{"text": "{bad}"}}], "sampling_params": {{"max_tokens": 2}}}}',
                ("body", "prompts", 0),
            ),
            (
                f"{base}/sample",
                f'{{"prompts": [{{"messages": [{{"role": "user", "content": "{bad}"}}]}}], '
                '"sampling_params": {"max_tokens": 2}}',
                ("body", "prompts", 0, "messages", 0, "content"),
            ),
            (
                f"{base}/sample",
                f'{{"prompts": [{{"tokens": [1]}}], "sampling_params": {{"max_tokens": 2, "stop": ["{bad}"]}}}}',
                ("body", "sampling_params", "stop", 0),
            ),
            (f"{base}/save", f'{{"name": "{bad}"}}', ("body", "name")),
            (f"{base}/load", f'{{"checkpoint": "{bad}"}}', ("body", "checkpoint")),
            ("/v1/runs", f'{{"base_model": "{bad}"}}', ("body", "base_model")),
            ("/v1/runs", '{"seed": 99999999999999999999}', ("body", "seed")),
            ("/v1/runs", '{"seed": 9223372036854775808}', ("body", "seed")),
            (
                f"{base}/sample",
                '{"prompts": [{"tokens": [1]}], "sampling_params": {"max_tokens": 2, "seed": 18446744073709551616}}',
                ("body", "sampling_params", "seed"),
            ),
        ]
        for path, raw, loc in cases:
            _assert_422_at(_post(url, path, raw), loc)
        assert [r.id for r in client.list_runs()] == [run.run_id]
        assert run.optim_step().result(timeout=60).step == 1


def test_lora_targets_that_would_break_the_shared_model_are_refused(make_server):
    """peft took ['embed_tokens'] half-way and then every run on the server failed to train
    or sample; 'lm_head' made a run that could never train; ['q_proj', 'mlp'] left stray LoRA
    layers; a plain string was used as a regular expression."""
    with make_server(**LIMITS) as server, ServiceClient(server.url, max_retries=0) as client:
        url = server.url
        healthy = client.create_training_run(lora_rank=2)
        for targets, loc in [
            (["embed_tokens"], ("body", "lora", "target_modules", 0)),
            (["lm_head"], ("body", "lora", "target_modules", 0)),
            (["q_proj", "mlp"], ("body", "lora", "target_modules", 1)),
            (["self_attn"], ("body", "lora", "target_modules", 0)),
            (["no_such_layer"], ("body", "lora", "target_modules", 0)),
            ("(", ("body", "lora", "target_modules")),
            (".*", ("body", "lora", "target_modules")),
        ]:
            response = httpx.post(f"{url}/v1/runs", json={"lora": {"target_modules": targets}}, timeout=60)
            _assert_422_at(response, loc)
            assert "q_proj" in response.text  # says which names would do
        for good in (["q_proj", "v_proj"], ["model.layers.0.mlp.down_proj"], "all-linear"):
            client.create_training_run(lora_rank=2, target_modules=good)
        # Every run still trains and samples, alone and batched together.
        example = datum_from_tokens([1, 2, 3], [4, 5])
        runs = client.list_runs()
        assert len(runs) == 4
        for info in runs:
            run = client.training_client(info.id)
            run.forward_backward([example]).result(timeout=60)
            assert run.optim_step(AdamParams(learning_rate=1e-2)).result(timeout=60).step == 1
        futures = [
            client.training_client(info.id).sample([[1, 2, 3]], sampling_params=SamplingParams(max_tokens=2))
            for info in runs
        ]
        assert all(len(f.result(timeout=60).sequences[0]) == 1 for f in futures)
        assert healthy.info().step == 1


def test_prompts_and_examples_over_the_token_limit_are_422(make_server):
    with make_server(**LIMITS) as server, ServiceClient(server.url, max_retries=0) as client:
        url, run = server.url, client.create_training_run()
        base = f"{url}/v1/runs/{run.run_id}"
        long_tokens = list(range(1, 66))  # 65 > max_prompt_tokens (64)
        _assert_422_at(
            httpx.post(
                f"{base}/sample", json={"prompts": [{"tokens": long_tokens}], "sampling_params": {"max_tokens": 2}}
            ),
            ("body", "prompts", 0, "tokens"),
        )
        _assert_422_at(
            httpx.post(
                f"{base}/sample", json={"prompts": [{"text": "word " * 200}], "sampling_params": {"max_tokens": 2}}
            ),
            ("body", "prompts", 0),
        )
        _assert_422_at(
            httpx.post(f"{base}/evaluate", json={"prompt": {"text": "hi"}, "responses": ["word " * 200]}),
            ("body", "responses", 0),
        )
        datum = {"model_input": {"tokens": long_tokens}, "loss_fn_inputs": {"target_tokens": long_tokens}}
        _assert_422_at(
            httpx.post(f"{base}/forward_backward", json={"data": [datum]}), ("body", "data", 0, "model_input", "tokens")
        )
        datum = {"model_input": {"tokens": [1]}, "loss_fn_inputs": {"target_tokens": [2]}}
        _assert_422_at(httpx.post(f"{base}/forward_backward", json={"data": [datum] * 5}), ("body", "data"))  # > 4
        _assert_422_at(
            httpx.post(
                f"{base}/sample",
                json={"prompts": [{"tokens": [1]}] * 3, "num_samples": 2, "sampling_params": {"max_tokens": 2}},
            ),
            ("body", "num_samples"),
        )
        assert run.info().step == 0


# ------------------------------------------------------------------- the Tinker protobuf door
def _forward_backward_body(target_tokens, weights) -> bytes:
    """A Tinker ForwardBackwardRequest (the SDK's own protobuf schema) with these tensors."""
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    msg = pb.ForwardBackwardRequest(model_id="sess_x:train:0", seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2, 3], "<i4").tobytes()
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        target_tokens or pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3], dense=np.array([2, 3, 4], "<i8").tobytes())
    )
    datum.loss_fn_inputs["weights"].CopyFrom(weights)
    return msg.SerializeToString()


def test_declared_tensor_shapes_over_the_limits_are_4xx_not_5xx(make_server):
    """177 bytes of sparse CSR declaring [3, 2^36] made numpy ask for 768 GiB: a 500, every time."""
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    csr = pb.SparseCsr(
        crow_indices=np.array([0, 1, 1, 1], "<i8").tobytes(),
        col_indices=np.array([5], "<i8").tobytes(),
        values=np.array([1.0], "<f4").tobytes(),
    )
    cases = [
        _forward_backward_body(None, pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3, 2**36], sparse_csr=csr)),
        _forward_backward_body(None, pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**40, 2**40], sparse_csr=csr)),
        _forward_backward_body(None, pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**62, 4], dense=b"")),
        _forward_backward_body(
            pb.Tensor(
                dtype=pb.DTYPE_INT64,
                shape=[3, 2**30],
                sparse_csr=pb.SparseCsr(crow_indices=np.array([0, 0, 0, 0], "<i8").tobytes()),
            ),
            pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], dense=np.ones(3, "<f4").tobytes()),
        ),
    ]
    with make_server(**LIMITS) as server:
        for body in cases:
            response = httpx.post(
                server.url + "/api/v1/forward_backward",
                content=body,
                timeout=60,
                headers={"Content-Type": "application/x-protobuf"},
            )
            assert response.status_code == 400, response.text
            assert "max_tokens_per_request" in response.json()["error"] and response.json()["category"] == "user"
        assert httpx.get(server.url + "/health").status_code == 200


def test_a_zstd_bomb_is_413_and_inflates_off_the_event_loop(make_server):
    """26-30 KB of zstd that inflates to 250 MB stalled /health 3 s per request (decoded on the
    event loop) and raised RSS by 2 GB. Each bomb is now inflated in chunks, off the loop, and
    stopped at max_request_bytes."""
    import threading

    import zstandard

    compressor = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    zeros = bytes(1 << 20)
    hidden = b"".join([*(compressor.compress(zeros) for _ in range(250)), compressor.flush()])  # 250 MB inflated
    declared = zstandard.ZstdCompressor().compress(zeros * 16)  # says it inflates to 16 MB
    assert len(hidden) < 64 * 1024
    with make_server(max_request_bytes=8 << 20) as server:
        answers, health = [], []

        def post(body: bytes) -> None:
            answers.append(
                httpx.post(
                    server.url + "/api/v1/forward_backward",
                    content=body,
                    timeout=120,
                    headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"},
                )
            )

        posters = [threading.Thread(target=post, args=(body,)) for body in (hidden, hidden, hidden, declared)]
        for thread in posters:
            thread.start()
        while any(thread.is_alive() for thread in posters):
            started = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=30).status_code == 200
            health.append(time.monotonic() - started)
        for thread in posters:
            thread.join()
        for response in answers:
            assert response.status_code == 413, response.text
            assert "max_request_bytes (8388608 bytes)" in response.json()["error"]
        assert max(health, default=0) < 1.0, health
