"""Checkpoint names and lifecycle through the official Tinker SDK (0.38) and tinker-cookbook 0.6.1
against an in-process server on the tiny Qwen2, two keyed users: one namespace per run (no two
APIs collide), pruning of the server's own snapshots only, weights-only sampler checkpoints, TTLs,
publishing, deletion with the run, and downloads through signed URLs that peft loads."""

from __future__ import annotations

import io
import json
import tarfile
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

tinker = pytest.importorskip("tinker", reason="the Tinker API needs the tinker package: pip install 'eztinker[tinker]'")
import torch  # noqa: E402
from tinker import types  # noqa: E402

from eztinker.launcher import ThreadedServer, build_service  # noqa: E402
from eztinker.server.settings import ServerSettings  # noqa: E402

ALICE, BOB = "tml-alice-key", "tml-bob-key"
PROMPT, REPLY = [100, 200, 300], [400, 500, 600, 700]
GREEDY = types.SamplingParams(max_tokens=4, temperature=0.0)
SWEEP_SECONDS = 0.3


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    keys = root / "keys.json"
    keys.write_text(json.dumps({ALICE: "alice", BOB: "bob"}))
    settings = ServerSettings(
        model=[str(tiny_model_dir)],
        data_dir=root / "data",
        device="cpu",
        api_keys_file=keys,
        checkpoint_sweep_seconds=SWEEP_SECONDS,
        sample_gather_ms=0,
    )
    with ThreadedServer(build_service(settings)) as running:
        yield running


@pytest.fixture(autouse=True)
def _offline_sdk(monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def alice(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def bob(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=BOB)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def trained(alice, tiny_model_dir):
    """A run of alice's trained two steps (different from its base model)."""
    client = alice.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    for _ in range(2):
        client.forward_backward([datum()], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return client


def datum(weights=None) -> types.Datum:
    tokens = PROMPT + REPLY
    weights = weights if weights is not None else [0.0] * (len(PROMPT) - 1) + [1.0] * len(REPLY)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def logprobs(client) -> list[float]:
    out = client.forward([datum()], "cross_entropy").result()
    return [float(lp) for o in out.loss_fn_outputs for lp in o["logprobs"].tolist()]


def greedy(sampler) -> list[int]:
    sampler = sampler.result() if hasattr(sampler, "result") else sampler
    return sampler.sample(types.ModelInput.from_ints(PROMPT), 1, GREEDY).result().sequences[0].tokens


def rest(server, key=ALICE):
    return tinker.RestClient(base_url=server.url, api_key=key)


def run_dir(server, run_id: str) -> Path:
    return server.service.checkpoint_root / run_id


def listed(server, run_id: str, key=ALICE) -> set[str]:
    return {c.checkpoint_id for c in rest(server, key).list_checkpoints(run_id).result().checkpoints}


def peft_logprobs(tiny_model_dir, adapter_dir: Path) -> list[float]:
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    tokens = PROMPT + REPLY
    with torch.no_grad():
        out = model(torch.tensor([tokens[:-1]])).logits.log_softmax(-1)[0]
    return [float(out[i, t]) for i, t in enumerate(tokens[1:])]


# ------------------------------------------------------------------------------- names
def test_a_sampler_save_and_a_state_save_never_write_the_same_checkpoint(server, trained):
    # Today's hole: save_state("sampler_weights.x") and save_weights_for_sampler("x") were one path.
    with pytest.raises(tinker.RequestFailedError, match="reserved prefix"):
        trained.save_state("sampler_weights.x").result()
    state = trained.save_state("x").result().path
    sampler = trained.save_weights_for_sampler("x").result().path
    assert state.endswith(f"{trained.model_id}/weights/x") and sampler.endswith(f"{trained.model_id}/sampler_weights/x")
    assert {"weights/x", "sampler_weights/x"} <= listed(server, trained.model_id)
    # The sampler save did not touch the training state: it still loads with its optimizer.
    trained.load_state_with_optimizer(state).result()
    # Nor can the REST API name a checkpoint into the sampler's namespace.
    answer = httpx.post(
        f"{server.url}/v1/runs/{trained.model_id}/save",
        json={"name": "sampler_weights.x"},
        headers={"X-API-Key": ALICE},
    )
    assert answer.status_code == 422 and "reserved prefix" in answer.text and "name" in answer.text


def test_snapshot_pruning_spares_a_named_sampler_checkpoint(server, alice, tiny_model_dir):
    client = alice.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    client.forward_backward([datum()], "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    keep = client.save_weights_for_sampler("session-keepme").result().path
    expected = greedy(alice.create_sampling_client(model_path=keep))
    for _ in range(6):
        client.save_weights_and_get_sampling_client().result()
    assert greedy(alice.create_sampling_client(model_path=keep)) == expected
    assert "sampler_weights/session-keepme" in listed(server, client.model_id)
    snapshots = [p for p in run_dir(server, client.model_id).iterdir() if p.name.startswith("sampler_weights._")]
    assert len(snapshots) == server.service.settings.sampler_snapshots_kept


def test_unnamed_snapshots_are_pruned_even_when_nobody_retrieves_their_futures(server, alice, tiny_model_dir):
    client = alice.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    session_id = client.model_id.split(":train:")[0]
    jobs = []
    for seq in range(100, 108):  # the SDK's wire call, its futures never retrieved
        answer = httpx.post(
            f"{server.url}/api/v1/save_weights_for_sampler",
            headers={"X-API-Key": ALICE},
            json={"model_id": client.model_id, "sampling_session_seq_id": seq},
        )
        jobs.append(answer.json()["request_id"])
    store = server.service.store
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(store.job(j).status == "completed" for j in jobs):
        time.sleep(0.05)
    time.sleep(3 * SWEEP_SECONDS)
    snapshots = sorted(p.name for p in run_dir(server, client.model_id).iterdir())
    kept = server.service.settings.sampler_snapshots_kept
    assert len(snapshots) == kept, snapshots
    assert snapshots == sorted(f"sampler_weights._{session_id}-sample-{s}" for s in range(108 - kept, 108))


def test_sampler_checkpoints_hold_no_optimizer_state(server, trained):
    state = trained.save_state("full").result().path
    sampler = trained.save_weights_for_sampler("light").result().path
    full, light = (
        run_dir(server, trained.model_id) / "full",
        run_dir(server, trained.model_id) / "sampler_weights.light",
    )
    assert (full / "optimizer.pt").is_file() and not (light / "optimizer.pt").exists()
    size = lambda folder: sum(f.stat().st_size for f in folder.iterdir())  # noqa: E731
    assert size(light) < 0.5 * size(full), (size(light), size(full))
    # Its weights load (without an optimizer state); asking for one is refused, naming why.
    before = logprobs(trained)
    trained.load_state(sampler).result()
    assert logprobs(trained) == pytest.approx(before, abs=1e-6)
    with pytest.raises(tinker.RequestFailedError, match="no optimizer state"):
        trained.load_state_with_optimizer(sampler).result()
    trained.load_state_with_optimizer(state).result()


# --------------------------------------------------------------------------- lifecycle
def test_an_expired_checkpoint_is_gone_from_disk_and_listing(server, trained):
    client = rest(server)
    path = trained.save_state("short", ttl_seconds=1).result().path
    [entry] = [
        c for c in client.list_checkpoints(trained.model_id).result().checkpoints if c.checkpoint_id == "weights/short"
    ]
    assert entry.expires_at is not None and 0 < entry.expires_at.timestamp() - time.time() <= 1.5
    kept = trained.save_weights_for_sampler("kept", ttl_seconds=3600).result().path
    time.sleep(1.0 + 3 * SWEEP_SECONDS)
    assert not (run_dir(server, trained.model_id) / "short").exists()
    ids = listed(server, trained.model_id)
    assert "weights/short" not in ids and "sampler_weights/kept" in ids
    with pytest.raises(tinker.RequestFailedError, match="not found"):
        trained.load_state(path).result()

    # set_checkpoint_ttl (today a 405): an existing checkpoint gets a TTL, or loses it.
    client.set_checkpoint_ttl_from_tinker_path(kept, None).result()
    assert (
        next(
            c for c in client.list_checkpoints(trained.model_id).result().checkpoints if c.tinker_path == kept
        ).expires_at
        is None
    )
    client.set_checkpoint_ttl_from_tinker_path(kept, 1).result()
    time.sleep(1.0 + 3 * SWEEP_SECONDS)
    assert "sampler_weights/kept" not in listed(server, trained.model_id)
    assert not (run_dir(server, trained.model_id) / "sampler_weights.kept").exists()


def test_a_published_checkpoint_is_visible_to_another_user_and_an_unpublished_one_is_not(server, alice, bob, trained):
    public = trained.save_weights_for_sampler("shared").result().path
    private = trained.save_weights_for_sampler("mine").result().path
    state = trained.save_state("shared-state").result().path
    mine = rest(server)
    mine.publish_checkpoint_from_tinker_path(public).result()
    mine.publish_checkpoint_from_tinker_path(state).result()
    flags = {c.checkpoint_id: c.public for c in mine.list_checkpoints(trained.model_id).result().checkpoints}
    assert flags["sampler_weights/shared"] and not flags["sampler_weights/mine"]

    expected = greedy(alice.create_sampling_client(model_path=public))
    assert greedy(bob.create_sampling_client(model_path=public)) == expected
    copy = bob.create_training_client_from_state(state).result()  # bob's own run, from alice's weights
    assert logprobs(copy) == pytest.approx(logprobs(trained), abs=1e-5)
    with pytest.raises(Exception, match="not found"):
        greedy(bob.create_sampling_client(model_path=private))
    theirs = rest(server, BOB)
    with pytest.raises(tinker.NotFoundError):  # publishing opens reading only
        theirs.delete_checkpoint_from_tinker_path(public).result()
    with pytest.raises(tinker.NotFoundError):
        theirs.unpublish_checkpoint_from_tinker_path(public).result()

    mine.unpublish_checkpoint_from_tinker_path(public).result()
    with pytest.raises(Exception, match="not found"):
        greedy(bob.create_sampling_client(model_path=public))


def test_deleting_a_run_deletes_its_checkpoints(server, alice, tiny_model_dir):
    client = alice.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    client.save_state("a").result()
    client.save_weights_for_sampler("b").result()
    assert run_dir(server, client.model_id).is_dir()
    answer = httpx.delete(f"{server.url}/v1/runs/{client.model_id}", headers={"X-API-Key": ALICE})
    assert answer.status_code == 200
    assert not run_dir(server, client.model_id).exists()
    assert server.service.store.checkpoints(client.model_id) == []
    everyone = rest(server).list_user_checkpoints(limit=1000).result().checkpoints
    assert not [c for c in everyone if c.tinker_path.startswith(f"tinker://{client.model_id}/")]


def test_a_deleted_runs_checkpoints_go_at_the_next_start_too(make_server, tmp_path):
    """A server stopped between marking a run deleted and removing its files (or a data
    directory from before this rule) loses them at its next start."""
    from eztinker import ServiceClient

    data = tmp_path / "restart"
    with make_server(data_dir=data) as first:
        run = ServiceClient(base_url=first.url).create_training_run(lora_rank=2)
        run.save_state("kept").result(timeout=60)
        gone = ServiceClient(base_url=first.url).create_training_run(lora_rank=2)
        gone.save_state("doomed").result(timeout=60)
        first.service.store.mark_run_deleted(gone.run_id)  # as if killed right after
    with make_server(data_dir=data) as second:
        store = second.service.store
        assert store.checkpoints(gone.run_id) == [] and not (second.service.checkpoint_root / gone.run_id).exists()
        assert [c.name for c in store.checkpoints(run.run_id)] == ["kept"]


# ---------------------------------------------------------------------------- downloads
def test_the_cookbooks_weights_download_gives_an_adapter_peft_loads_to_the_servers_logits(
    server, trained, tiny_model_dir, tmp_path, monkeypatch
):
    weights = pytest.importorskip("tinker_cookbook.weights")
    monkeypatch.setenv("TINKER_API_KEY", ALICE)
    state = trained.save_state("for-download").result().path
    folder = weights.download(tinker_path=state, output_dir=str(tmp_path / "adapter"), base_url=server.url)
    assert sorted(p.name for p in Path(folder).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert peft_logprobs(tiny_model_dir, Path(folder)) == pytest.approx(logprobs(trained), abs=1e-4)
    # Its temporary export (an external_weights checkpoint of a new run) was deleted afterwards.
    assert not [
        c
        for c in rest(server).list_user_checkpoints(limit=1000).result().checkpoints
        if c.checkpoint_type == "external"
    ]


def test_the_sdks_checkpoint_download_command_writes_the_adapter(server, trained, tiny_model_dir, tmp_path):
    """`tinker checkpoint download` (SDK 0.38's CLI, unmodified): a training checkpoint is exported
    through a temporary external_weights checkpoint of a new run and fetched from its URLs."""
    import os
    import subprocess
    import sys

    state = trained.save_state("for-cli").result().path
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": ALICE, "TINKER_TELEMETRY": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "checkpoint", "download", state, "--output", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [folder] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert peft_logprobs(tiny_model_dir, folder) == pytest.approx(logprobs(trained), abs=1e-4)


def test_external_weights_urls_work_without_a_key_and_expire_with_the_checkpoint(
    server, trained, tiny_model_dir, tmp_path
):
    path = trained.save_weights_external("export", ttl_seconds=3600).result().path
    assert path == f"tinker://{trained.model_id}/external_weights/export"
    response = rest(server).get_external_weights_urls(path).result()
    assert sorted(response.urls) == ["adapter_config.json", "adapter_model.safetensors"]
    assert response.expires.timestamp() > time.time() + 60
    folder = tmp_path / "external"
    folder.mkdir()
    for name, url in response.urls.items():
        urllib.request.urlretrieve(url, folder / name)  # no key
    assert peft_logprobs(tiny_model_dir, folder) == pytest.approx(logprobs(trained), abs=1e-4)
    # A forged or altered token opens nothing; a deleted checkpoint's URLs stop working.
    url = response.urls["adapter_config.json"]
    assert httpx.get(url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")).status_code == 403
    rest(server).delete_checkpoint_from_tinker_path(path).result()
    assert httpx.get(url).status_code == 404


def test_the_archive_url_answers_the_old_sdks_contract(server, trained, tiny_model_dir, tmp_path):
    """SDKs 0.25-0.34 ask for JSON {url, expires} (or follow a 302 themselves), then fetch the URL
    with no key and want a tar with a PEFT adapter and a `checkpoint_complete` member."""
    trained.save_state("archived").result()
    route = f"{server.url}/api/v1/training_runs/{trained.model_id}/checkpoints/weights/archived/archive"
    answer = httpx.get(route, headers={"X-API-Key": ALICE, "Accept": "application/json"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"url", "expires"}
    redirect = httpx.get(route, headers={"X-API-Key": ALICE})
    assert redirect.status_code == 302 and redirect.headers["Location"].startswith(server.url)
    assert "Expires" in redirect.headers
    tar_bytes = httpx.get(body["url"]).content  # no key
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint_complete"]
        tar.extractall(tmp_path / "archive", filter="data")
    assert peft_logprobs(tiny_model_dir, tmp_path / "archive") == pytest.approx(logprobs(trained), abs=1e-4)
    # Another user's request for it is a 404, and so is a key-less one a 401.
    assert httpx.get(route, headers={"X-API-Key": BOB, "Accept": "application/json"}).status_code == 404
    assert httpx.get(route, headers={"Accept": "application/json"}).status_code == 401


def test_a_database_from_before_the_lifecycle_columns_keeps_working(tmp_path):
    """Opening an old database adds the columns; the unnamed snapshots it holds (those an unnamed
    sampling session samples from) become the server's to prune, and nothing else does."""
    import sqlite3

    from eztinker.server.store import Store

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE runs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, base_model TEXT NOT NULL, lora TEXT NOT NULL,
            seed INTEGER NOT NULL, step INTEGER NOT NULL DEFAULT 0, restored_from TEXT, resume_from TEXT,
            created_at REAL NOT NULL, deleted_at REAL);
        CREATE TABLE checkpoints (run_id TEXT NOT NULL REFERENCES runs(id), name TEXT NOT NULL, path TEXT NOT NULL,
            step INTEGER NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (run_id, name));
        CREATE TABLE samplers (id TEXT PRIMARY KEY, owner TEXT NOT NULL, base_model TEXT NOT NULL, checkpoint TEXT,
            model_path TEXT, created_at REAL NOT NULL);
        INSERT INTO runs VALUES ('s:train:0', 'u', 'm', '{"rank": 1}', 0, 3, NULL, NULL, 1.0, NULL);
        INSERT INTO checkpoints VALUES ('s:train:0', 'sampler_weights.session-s-sample-1', 'c/a', 3, 2.0);
        INSERT INTO checkpoints VALUES ('s:train:0', 'sampler_weights.session-keepme', 'c/b', 3, 3.0);
        INSERT INTO checkpoints VALUES ('s:train:0', 'final', 'c/c', 3, 4.0);
        INSERT INTO samplers VALUES ('s:sample:1', 'u', 'm', 's:train:0/sampler_weights.session-s-sample-1', NULL, 2.0);
        INSERT INTO samplers VALUES ('s:sample:2', 'u', 'm', 's:train:0/sampler_weights.session-keepme',
            'tinker://s:train:0/sampler_weights/session-keepme', 3.0);
    """)
    db.commit()
    db.close()
    store = Store(path)
    assert [c.name for c in store.auto_checkpoints("s:train:0")] == ["sampler_weights.session-s-sample-1"]
    assert [(c.name, c.public, c.expires_at) for c in store.checkpoints("s:train:0", include_auto=False)] == [
        ("sampler_weights.session-keepme", False, None),
        ("final", False, None),
    ]
    store.close()
    Store(path).close()  # opening it again changes nothing
