"""The Tinker door's edge, spoken as the SDK speaks it (JSON bodies, futures): another user's
request never touches a model's sequence, and a sample whose session ended stops decoding."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytest.importorskip("tinker")

ALICE, BOB = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}


@pytest.fixture()
def server(make_server, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"key-a": "alice", "key-b": "bob"}))
    # Samples long enough (8 x 8192 tokens) that no machine decodes half of them before a session ends.
    with make_server(api_keys_file=keys, tinker_session_timeout_seconds=3, max_new_tokens=8192) as running:
        yield running


def call(server, path: str, headers: dict, body: dict, timeout: float = 60) -> dict:
    response = httpx.post(f"{server.url}/api/v1/{path}", headers=headers, json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def result(server, headers: dict, request_id: str) -> dict:
    while (answer := call(server, "retrieve_future", headers, {"request_id": request_id})).get("type") == "try_again":
        pass
    return answer


def new_model(server, headers: dict) -> tuple[str, str]:
    session = call(server, "create_session", headers, {})["session_id"]
    future = call(
        server,
        "create_model",
        headers,
        {
            "session_id": session,
            "model_seq_id": 0,
            "base_model": server.service.default_model,
            "lora_config": {"rank": 4},
        },
    )
    return session, result(server, headers, future["request_id"])["model_id"]


def test_another_users_request_is_refused_at_once_and_never_moves_the_sequence(server):
    _, model_id = new_model(server, ALICE)
    started = time.monotonic()
    future = call(server, "optim_step", BOB, {"model_id": model_id, "seq_id": 10**6})
    assert time.monotonic() - started < 5  # it used to wait 30 s for seq_ids that never come
    refused = result(server, BOB, future["request_id"])
    assert refused["category"] == "user" and "not found" in refused["error"]

    # Alice's seq_id 2 still waits for her seq_id 1 (bob's 10^6 had moved the sequence past it).
    answers: dict[int, dict] = {}

    def step(seq_id: int) -> None:
        answers[seq_id] = call(server, "optim_step", ALICE, {"model_id": model_id, "seq_id": seq_id})

    second = threading.Thread(target=step, args=(2,))
    second.start()
    second.join(1.5)
    assert second.is_alive() and 2 not in answers
    step(1)
    second.join(30)
    assert [result(server, ALICE, answers[s]["request_id"])["metrics"]["step"] for s in (1, 2)] == [1, 2]


def test_a_sample_whose_session_ended_stops_decoding(server):
    """The SDK's futures are read only by the session that made them: once it is finished (or
    stops beating for tinker_session_timeout_seconds), its samples stop at their next step."""
    for end in ("finish", "timeout"):
        session = call(server, "create_session", ALICE, {})["session_id"]
        sampler = call(
            server,
            "create_sampling_session",
            ALICE,
            {
                "session_id": session,
                "sampling_session_seq_id": 0,
                "base_model": server.service.default_model,
            },
        )["sampling_session_id"]
        future = call(
            server,
            "asample",
            ALICE,
            {
                "sampling_session_id": sampler,
                "num_samples": 8,
                "prompt": {"chunks": [{"tokens": [1, 2, 3]}]},
                "sampling_params": {"max_tokens": 8192, "temperature": 1.0},
            },
        )["request_id"]
        if end == "finish":
            time.sleep(0.5)
            httpx.post(f"{server.url}/api/v1/sessions/{session}/finish", headers=ALICE, timeout=30)
        # (timeout: no heartbeat at all; the session ends 3 s after its creation)
        answer = result(server, ALICE, future)
        assert answer.get("category") == "user" and answer["error"].startswith("abandoned"), (end, answer)
        decoded = int(answer["error"].split("after ")[1].split(" of")[0])
        assert decoded < 8 * 8192 / 2, (end, answer["error"])
        # A new sample for the ended session is refused, not decoded for nobody.
        again = call(
            server,
            "asample",
            ALICE,
            {"sampling_session_id": sampler, "num_samples": 1, "prompt": {"chunks": [{"tokens": [1, 2, 3]}]}},
        )["request_id"]
        assert "has ended" in result(server, ALICE, again)["error"]
