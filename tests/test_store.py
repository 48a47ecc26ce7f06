"""The store hands out frozen records, and listing runs costs the same queries however many there are."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading

import pytest

from eztinker.server.records import CheckpointLifecycle, CheckpointRecord, JobRecord, RunRecord, SessionRecord
from eztinker.server.store import Store
from eztinker.types import JobStatus, LoraConfig


@pytest.fixture()
def store(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    yield store
    store.close()


def test_the_store_returns_frozen_records_not_rows(store):
    store.add_run("run_a", "alice", "m", LoraConfig(rank=2), seed=7, metadata={"user_metadata": {"k": "v"}})
    store.add_job("job_save", "alice", "run_a", "save")
    store.record_save("job_save", "run_a", "c1", "checkpoints/run_a/c1", 0, CheckpointLifecycle(meta={"x": 1}))
    store.add_session("sess_1", "alice", {"tags": ["t"]})

    run, job, checkpoint, session = (
        store.run("run_a"),
        store.job("job_save"),
        store.checkpoint("run_a", "c1"),
        store.session("sess_1", "alice"),
    )
    assert isinstance(run, RunRecord) and isinstance(job, JobRecord)
    assert isinstance(checkpoint, CheckpointRecord) and isinstance(session, SessionRecord)
    assert (run.owner, run.lora.rank, run.seed, run.metadata) == ("alice", 2, 7, {"user_metadata": {"k": "v"}})
    assert (job.owner, job.status, job.result()["name"]) == ("alice", JobStatus.completed, "c1")
    assert (checkpoint.ref, checkpoint.meta, checkpoint.auto) == ("run_a/c1", {"x": 1}, False)
    assert run.resume_from == "run_a/c1"  # a save with the optimizer state: what a restart restores
    for record in (run, job, checkpoint, session):
        assert not isinstance(record, sqlite3.Row)
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.id = "changed"  # type: ignore[misc,union-attr]
    assert store.job_by_key("alice", "no-such-key") is None


def test_a_deleted_run_is_gone_from_run_but_not_from_run_any(store):
    store.add_run("run_a", "alice", "m", LoraConfig(rank=2), seed=0)
    store.mark_run_deleted("run_a")
    assert store.run("run_a") is None and store.live_runs("alice") == []
    deleted = store.run_any("run_a")
    assert deleted is not None and deleted.deleted


def _add_runs(service, owner: str, count: int) -> None:
    """`count` runs of `owner`, each with a listed checkpoint, an expired one and an unnamed snapshot."""
    store = service.store
    for i in range(count):
        run_id = f"run_{owner}_{i}"
        store.add_run(run_id, owner, service.default_model, LoraConfig(rank=2), seed=i)
        store.record_save(f"job_{run_id}_c1", run_id, "c1", f"checkpoints/{run_id}/c1", 0)
        store.record_save(
            f"job_{run_id}_old", run_id, "old", f"checkpoints/{run_id}/old", 0, CheckpointLifecycle(ttl_seconds=-1)
        )
        store.record_save(
            f"job_{run_id}_snap",
            run_id,
            "sampler_weights.snap",
            f"checkpoints/{run_id}/snap",
            0,
            CheckpointLifecycle(with_optimizer=False, auto=True),
        )


def _statements(service, call):
    """What `call()` returns, and the SQL statements it ran on this thread (the worker and the
    sweep run theirs on their own threads)."""
    me, statements = threading.get_ident(), []

    def record(sql: str) -> None:
        if threading.get_ident() == me:
            statements.append(sql)

    service.store.trace(record)
    try:
        return call(), statements
    finally:
        service.store.trace(None)


def test_listing_runs_costs_the_same_queries_for_1_and_20_runs(make_server):
    """A run's checkpoints come from one grouped query for all of the user's runs (once one per
    run: 21 queries for 20 runs), and the listing still shows each run its own checkpoints."""
    with make_server() as server:
        service = server.service
        _add_runs(service, "one", 1)
        _add_runs(service, "twenty", 20)

        one, one_queries = _statements(service, lambda: service.list_runs("one"))
        twenty, twenty_queries = _statements(service, lambda: service.list_runs("twenty"))
        single, single_queries = _statements(service, lambda: service.get_run("twenty", "run_twenty_7"))

        assert len(one) == 1 and len(twenty) == 20
        assert len(one_queries) == len(twenty_queries) <= 5, twenty_queries
        assert len(single_queries) <= len(twenty_queries) + 1  # + the ownership check
        for info in [*one, *twenty, single]:
            # Only its own named, unexpired checkpoint: not the expired one, not the server's snapshot.
            assert [(c.run_id, c.name) for c in info.checkpoints] == [(info.id, "c1")]
            assert info.status == "idle"
        assert single == twenty[7]
