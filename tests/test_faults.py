"""Faults: SIGKILL of the real server process mid-training and mid-checkpoint-save, crashes at
every step of an atomic checkpoint write, corrupted and escaping checkpoint files.

After every crash and restart the same invariants must hold (`assert_consistent`):
the database opens; every run and every completed checkpoint is listed; every listed checkpoint
directory is complete and readable; no staging, retired or unrecorded checkpoint directory is
left; interrupted jobs are failed with a reason; each run is back at its last saved checkpoint
(same adapter, same step) and trains on from there.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from support import EXAMPLE, FAST, score, slow_batch, train

from eztinker import APIStatusError, JobFailedError, ServiceClient
from eztinker.launcher import free_port

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "training_state.json"}
# Two crash/restart rounds: each run is the victim once, and the second crash hits a server that
# was itself restored from a crash, with state saved after that restart (a third round repeated
# the first's victim).
ROUNDS = 2


# ------------------------------------------------------------------------------- helpers
def wait_status(client, job_id: str, statuses: tuple[str, ...], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while (status := client.job(job_id).status.value) not in statuses and time.monotonic() < deadline:
        time.sleep(0.005)
    return status


def wait_writing(root: Path, name: str, timeout: float = 30) -> bool:
    """Wait until checkpoint `name` is being written (its staging directory exists) or is
    already written; True if caught mid-write."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if root.is_dir():
            names = [p.name for p in root.iterdir()]
            if any(n.startswith(f".staging-{name}-") for n in names):
                return True
            if name in names:
                return False
        time.sleep(0.0005)
    raise AssertionError(f"checkpoint {name} was never written under {root}")


def assert_consistent(data_dir: Path, client: ServiceClient, expected: dict[str, dict]) -> None:
    """The invariants after a restart. `expected[run_id]` = {"checkpoints": {name: step},
    "resume": name or None, "score": sum_logprob at `resume`}."""
    assert client.health().status == "ok"
    runs = {r.id: r for r in client.list_runs()}
    assert set(runs) == set(expected), (sorted(runs), sorted(expected))
    root = data_dir / "checkpoints"
    leftovers = [p for p in root.rglob("*") if p.name.startswith((".staging-", ".retired-"))]
    assert leftovers == [], leftovers
    for run_id, want in expected.items():
        info = runs[run_id]
        listed = {c.name: c.step for c in info.checkpoints}
        assert listed == want["checkpoints"], (run_id, listed, want["checkpoints"])
        on_disk = {p.name for p in (root / run_id).iterdir()} if (root / run_id).exists() else set()
        assert on_disk == set(listed), f"unlisted or missing checkpoint directories: {on_disk ^ set(listed)}"
        for checkpoint in info.checkpoints:
            directory = data_dir / checkpoint.path
            assert {p.name for p in directory.iterdir()} == CHECKPOINT_FILES, directory
            assert json.loads((directory / "training_state.json").read_text())["step"] == checkpoint.step
            assert load_file(directory / "adapter_model.safetensors")  # complete, parseable
            torch.load(directory / "optimizer.pt", weights_only=True)
        resume = want["resume"]
        assert info.restored_from == (f"{run_id}/{resume}" if resume else None), info
        assert info.step == (listed[resume] if resume else 0), info


def assert_interrupted_or_done(client, job_id: str) -> str:
    job = client.job(job_id)
    assert job.status.value in ("completed", "failed"), job
    if job.status.value == "failed":
        assert "interrupted" in job.error and "server stopped" in job.error, job
    return job.status.value


# ---------------------------------------------------- SIGKILL mid forward_backward, 2 rounds
def test_sigkill_mid_forward_backward_repeatedly(start_server, tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    server = start_server(data_dir, port)
    expected: dict[str, dict] = {}
    with ServiceClient(server.url, max_retries=8) as client:
        runs = [client.create_training_run(lora_rank=2, seed=i) for i in range(2)]
        for run in runs:
            expected[run.run_id] = {"checkpoints": {}, "resume": None, "score": None}
        for round_ in range(ROUNDS):
            for run in runs:
                want = expected[run.run_id]
                steps = train(run, 2)
                name = f"r{round_}"
                assert run.save_state(name).result(timeout=60).step == steps[-1]
                want["checkpoints"][name] = steps[-1]
                want["resume"], want["score"] = name, score(run)
                train(run, 1)  # after the checkpoint: lost by the crash, by design
            # A long forward_backward running on one run, more work queued behind on both.
            victim = runs[round_ % 2]
            running = victim.forward_backward(slow_batch(1500 + 250 * round_))
            queued = [victim.optim_step(FAST), runs[0].forward_backward([EXAMPLE]), runs[1].optim_step(FAST)]
            assert wait_status(client, running.job_id, ("running",)) == "running"
            time.sleep(random.uniform(0.0, 0.2))
            server.kill()
            assert server.process.returncode == -signal.SIGKILL

            server = start_server(data_dir, port)  # same directory, same port, same client
            assert_consistent(data_dir, client, expected)
            for job_id in [running.job_id, *(f.job_id for f in queued)]:
                assert assert_interrupted_or_done(client, job_id) == "failed"
            for run in runs:
                want = expected[run.run_id]
                assert score(run) == pytest.approx(want["score"], rel=1e-5)  # the checkpoint's adapter
                assert train(run, 1) == [want["checkpoints"][want["resume"]] + 1]  # and it trains on
                want["checkpoints"][f"after{round_}"] = run.save_state(f"after{round_}").result(timeout=60).step
                want["resume"], want["score"] = f"after{round_}", score(run)
    server.kill()


# ------------------------------------------------------- SIGKILL mid checkpoint save, 2 rounds
KILL_AT_SAVE = (0, 6)  # per round: the save (of 12) whose start triggers the kill


def test_sigkill_mid_checkpoint_save_repeatedly(start_server, tmp_path):
    """A burst of saves (about 15-25 ms each on the tiny model) is killed part-way, as soon as a
    chosen save is seen being written on disk (the first one, then the seventh: none and several
    completed before it); where inside that write the kill lands is left to timing. The saves that completed
    are listed and whole, the one being written and the ones queued are failed and leave nothing
    behind, whichever it turned out to be. (Each step of an atomic write is crashed
    deterministically in test_crash_at_every_step_of_a_checkpoint_write.)"""
    data_dir, port = tmp_path / "data", free_port()
    server = start_server(data_dir, port)
    outcomes = []  # per kill: (saves completed before it, staging seen, where the kill landed)
    with ServiceClient(server.url, max_retries=8) as client:
        # rank 64: bigger files, so a kill lands inside a write more often.
        run = client.create_training_run(lora_rank=64)
        other = client.create_training_run(lora_rank=2)
        expected = {r.run_id: {"checkpoints": {}, "resume": None, "score": None} for r in (run, other)}
        train(other, 1)
        for round_, kill_at in enumerate(KILL_AT_SAVE):
            want = expected[run.run_id]
            step = train(run, 1)[0]
            at_step = score(run)
            saves = {f"k{round_}-{i}": run.save_state(f"k{round_}-{i}") for i in range(12)}
            # Watched on disk, not through the API: a save is over before a status poll returns.
            writing = wait_writing(data_dir / "checkpoints" / run.run_id, f"k{round_}-{kill_at}")
            server.kill()

            server = start_server(data_dir, port)
            for name, future in saves.items():
                if assert_interrupted_or_done(client, future.job_id) == "completed":
                    want["checkpoints"][name] = step
                    want["resume"], want["score"] = name, at_step
            assert_consistent(data_dir, client, expected)
            log = server.log()
            landed = {
                "mid-write": log.count("cleaned up an interrupted checkpoint write"),
                "after-rename": log.count("its save was interrupted before it was recorded"),
            }
            outcomes.append((sum(n in want["checkpoints"] for n in saves), writing, landed))
            if want["resume"] is not None:
                assert score(run) == pytest.approx(want["score"], rel=1e-5)
            # Training continues from the restored step, and saving works again.
            base_step = want["checkpoints"][want["resume"]] if want["resume"] else 0
            assert train(run, 1) == [base_step + 1]
            want["checkpoints"][f"ok{round_}"] = run.save_state(f"ok{round_}").result(timeout=60).step
            want["resume"], want["score"] = f"ok{round_}", score(run)
            assert train(other, 1)[0] >= 1
            expected[other.run_id]["checkpoints"][f"o{round_}"] = other.save_state(f"o{round_}").result(timeout=60).step
            expected[other.run_id]["resume"] = f"o{round_}"
    server.kill()
    print(f"\nkills mid-save (saves completed of 12, staging seen, partial writes cleaned up): {outcomes}")


# ------------------------------------------------- crashes at each step of an atomic write
CRASH_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    # Standard library only: the child starts in a fraction of a second.
    from eztinker import atomic_writes as checkpoints

    mode, target, source = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def write(staging):
        for f in sorted(source.iterdir()):
            data = f.read_bytes()
            if mode == "mid-write" and f.name == "optimizer.pt":
                (staging / f.name).write_bytes(data[: len(data) // 2])
                die()
            (staging / f.name).write_bytes(data)

    if mode in ("between-renames", "after-rename"):
        real_rename, calls = os.rename, []
        def rename(a, b):
            real_rename(a, b)
            calls.append(b)
            if mode == "between-renames" or Path(b) == target:
                die()
        checkpoints.os.rename = rename
    checkpoints.write_atomically(target, write)
    sys.exit(3)  # not reached: every mode dies first
""")


def crash_while_writing(mode: str, target: Path, source: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CRASH_CHILD, mode, str(target), str(source)], capture_output=True)
    assert result.returncode == -signal.SIGKILL, (mode, result.returncode, result.stderr.decode()[-2000:])


def test_crash_at_every_step_of_a_checkpoint_write(make_server, tmp_path):
    """SIGKILL (i) mid-file in the staging directory, (ii) between the two renames of an
    overwrite, (iii) after the rename but before the database recorded it: on restart each
    leaves the last recorded checkpoint intact and listed, and nothing else."""
    data_dir = tmp_path / "data"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url) as client:
        run = client.create_training_run(lora_rank=4)
        train(run, 2)
        run.save_state("c1").result(timeout=60)
        at_c1 = score(run)
        run.save_state("over").result(timeout=60)
        train(run, 1)
        run.save_state("newer").result(timeout=60)
        train(run, 1)
    root = data_dir / "checkpoints" / run.run_id
    c1_bytes = {p.name: p.read_bytes() for p in (root / "c1").iterdir()}
    newer = root / "newer"

    crash_while_writing("mid-write", root / "c2", newer)  # a new checkpoint, half-written
    crash_while_writing("between-renames", root / "c1", newer)  # overwriting c1: c1 moved aside
    assert not (root / "c1").exists() and any(p.name.startswith(".retired-c1-") for p in root.iterdir())
    crash_while_writing("after-rename", root / "c3", newer)  # complete, never recorded
    assert (root / "c3").is_dir()
    crash_while_writing("after-rename", root / "over", newer)  # overwriting "over": new content in
    assert (root / "over").is_dir() and any(p.name.startswith(".retired-over-") for p in root.iterdir())

    with make_server(data_dir=data_dir) as server, ServiceClient(server.url) as client:
        assert sorted(p.name for p in root.iterdir()) == ["c1", "newer", "over"]
        assert {p.name: p.read_bytes() for p in (root / "c1").iterdir()} == c1_bytes  # rolled back, intact
        restored = client.training_client(run.run_id)
        info = restored.info()
        # "over" holds what the interrupted overwrite wrote (complete); its step says so.
        assert {c.name: c.step for c in info.checkpoints} == {"c1": 2, "over": 3, "newer": 3}
        assert (root / "over" / "adapter_model.safetensors").read_bytes() == (
            newer / "adapter_model.safetensors"
        ).read_bytes()
        assert (info.step, info.restored_from) == (3, f"{run.run_id}/newer")
        assert restored.load_state("c1").result(timeout=60)["step"] == 2
        assert score(restored) == pytest.approx(at_c1, rel=1e-5)
        assert train(restored, 1) == [3]
        assert restored.save_state("c2").result(timeout=60).step == 3  # the names are free again
        assert restored.save_state("c3").result(timeout=60).step == 3


# ------------------------------------------------------------------ a full disk during a save
FULL_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from eztinker import atomic_writes as checkpoints

    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    writers = {"torch.save": lambda d: torch.save({"m": torch.zeros(100_000)}, d / "optimizer.pt"),
               "safetensors": lambda d: save_file({"m": torch.zeros(100_000)}, d / "adapter_model.safetensors")}
    errors = {}
    for name, writer in writers.items():
        try:
            checkpoints.write_atomically(Path(sys.argv[1]) / name, writer)
        except checkpoints.CheckpointWriteError as exc:
            errors[name] = str(exc)
    print(json.dumps(errors))
""")


def test_a_save_past_the_file_size_limit_says_so_and_leaves_nothing(tmp_path):
    """A real limit (RLIMIT_FSIZE in a child process): torch.save alone would say '[enforce fail
    at inline_container.cc:672] unexpected pos ...'."""
    root = tmp_path / "checkpoints" / "run_a"
    result = subprocess.run([sys.executable, "-c", FULL_CHILD, str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    limit = "a file would exceed the process's file-size limit (RLIMIT_FSIZE)"
    assert json.loads(result.stdout) == {
        "torch.save": f"could not write checkpoint run_a/torch.save: {limit}",
        "safetensors": f"could not write checkpoint run_a/safetensors: {limit}",
    }
    assert list(root.iterdir()) == []  # no staging directory, no checkpoint


def test_a_save_on_a_full_disk_fails_its_job_saying_so(make_server, tmp_path, monkeypatch):
    """A full disk simulated where it shows: torch.save raises its errno-less RuntimeError and the
    file system reports no free space. The job says why; nothing is listed or left on disk;
    the run trains and saves on once there is room."""
    import eztinker.atomic_writes as checkpoints

    data_dir = tmp_path / "data"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run(lora_rank=2)
        train(run, 1)
        full = os.statvfs_result((4096, 4096, 1000, 1000, 0, 100, 50, 0, 0, 255))
        with monkeypatch.context() as patch:
            patch.setattr(checkpoints.os, "statvfs", lambda path: full)
            patch.setattr(torch, "save", _raise_unexpected_pos)
            with pytest.raises(JobFailedError) as err:
                run.save_state("c").result(timeout=60)
        assert f"could not write checkpoint {run.run_id}/c: no space left on the device" in err.value.error
        assert run.info().checkpoints == []
        assert list((data_dir / "checkpoints" / run.run_id).iterdir()) == []
        assert train(run, 1) == [2]
        assert run.save_state("c").result(timeout=60).step == 2


def _raise_unexpected_pos(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def test_a_write_failing_with_enospc_names_the_lack_of_space(tmp_path):
    import errno

    from eztinker.atomic_writes import CheckpointWriteError, write_atomically

    def write(staging):
        (staging / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="could not write checkpoint run_a/c1: no space left on the device"):
        write_atomically(tmp_path / "run_a" / "c1", write)
    assert list((tmp_path / "run_a").iterdir()) == []


# -------------------------------------------- a run restores what it loaded, not what it became
def test_a_run_comes_back_as_what_it_loaded_after_the_source_is_overwritten_or_deleted(make_server, tmp_path):
    """Run L loads A/c1 (A's step 2); A then saves c1 again at step 7 (and later deletes it):
    after each restart L is back at step 2, with the adapter it loaded.

    Chosen over refusing the overwrite: the load keeps a private snapshot of the checkpoint made
    of hard links (<data_dir>/snapshots/<run>/<job>), so it costs no disk space until the source
    is overwritten or deleted, and then exactly the bytes the run needs. Refusing would need a
    check at submission and again in the worker (a load queued before the save races it), the
    same again for deletes, and would make A's ordinary overwrite fail because of another run."""
    data_dir = tmp_path / "data"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        a, loader = client.create_training_run(lora_rank=2), client.create_training_run(lora_rank=2, seed=1)
        train(a, 2)
        a.save_state("c1").result(timeout=60)
        assert loader.load_state(f"{a.run_id}/c1").result(timeout=60)["step"] == 2
        loaded = score(loader)
        loaded_inode = (data_dir / "checkpoints" / a.run_id / "c1" / "adapter_model.safetensors").stat().st_ino
        train(a, 5)
        assert a.save_state("c1").result(timeout=60).step == 7
    for restart in ("after the overwrite", "after the delete"):
        with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
            info = client.training_client(loader.run_id).info()
            assert (info.step, info.restored_from) == (2, f"{a.run_id}/c1"), restart
            assert score(client.training_client(loader.run_id)) == pytest.approx(loaded, rel=1e-5), restart
            [snapshot] = (data_dir / "snapshots" / loader.run_id).glob("*/adapter_model.safetensors")
            assert snapshot.stat().st_ino == loaded_inode  # a hard link: no space until the source went
            if restart == "after the overwrite":
                server.service.delete_checkpoint("default", a.run_id, "c1")
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        reloaded = client.training_client(loader.run_id)
        assert train(reloaded, 1) == [3]
        reloaded.save_state("own").result(timeout=60)  # it restores from its own save now
        assert not any((data_dir / "snapshots" / loader.run_id).iterdir())


# ---------------------------------------------------------------- corrupted checkpoint files
def test_corrupted_checkpoint_fails_its_job_alone(make_server, tmp_path):
    data_dir = tmp_path / "data"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run(lora_rank=2)
        other = client.create_training_run(lora_rank=2, seed=1)
        train(run, 2)
        for name in ("bad-adapter", "bad-optimizer", "resume"):
            run.save_state(name).result(timeout=60)
        root = data_dir / "checkpoints" / run.run_id
        adapter = root / "bad-adapter" / "adapter_model.safetensors"
        adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])  # truncated
        optimizer = root / "bad-optimizer" / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:100])
        train(run, 1)
        before = score(run)

        for name, broken in (("bad-adapter", "adapter_model.safetensors"), ("bad-optimizer", "optimizer.pt")):
            with pytest.raises(JobFailedError) as err:
                run.load_state(name).result(timeout=60)
            assert "corrupted" in err.value.error and broken in err.value.error, err.value.error
            # The run is untouched: same adapter (the optimizer file is read before any
            # tensor is replaced), same step, still training; so is the other run.
            assert score(run) == pytest.approx(before, rel=1e-6)
            assert run.info().step == 3
        with pytest.raises(APIStatusError) as err:  # a new run from it: 422 naming the problem
            client.create_training_run(lora_rank=2, from_checkpoint=f"{run.run_id}/bad-adapter")
        assert err.value.status_code == 422 and "from_checkpoint" in str(err.value) and "corrupted" in str(err.value)
        assert train(run, 1) == [4] and train(other, 2) == [1, 2]
        assert client.health().status == "ok" and len(client.list_runs()) == 2

        # The run's resume point is corrupted on disk before a restart: the server still starts,
        # that run restarts fresh (logged), the others are restored.
        run.load_state("resume").result(timeout=60)
        other.save_state("o").result(timeout=60)
        at_o = score(other)
        adapter = root / "resume" / "adapter_model.safetensors"
        adapter.write_bytes(b"\0" * 64)

    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        infos = {r.id: r for r in client.list_runs()}
        assert (infos[run.run_id].step, infos[run.run_id].restored_from) == (0, None)
        assert (infos[other.run_id].step, infos[other.run_id].restored_from) == (2, f"{other.run_id}/o")
        assert score(client.training_client(other.run_id)) == pytest.approx(at_o, rel=1e-5)
        assert train(client.training_client(run.run_id), 1) == [1]


# ------------------------------------------------------- checkpoint paths escaping the data dir
def test_symlinked_checkpoints_pointing_outside_are_refused(make_server, tmp_path):
    data_dir, outside = tmp_path / "data", tmp_path / "outside"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run(lora_rank=2)
        train(run, 1)
        run.save_state("real").result(timeout=60)
        run.save_state("swapped").result(timeout=60)
        root = data_dir / "checkpoints" / run.run_id
        # A checkpoint directory replaced by a symlink to a (valid) copy outside the data dir.
        shutil.copytree(root / "swapped", outside / "copy")
        shutil.rmtree(root / "swapped")
        (root / "swapped").symlink_to(outside / "copy", target_is_directory=True)
        for attempt in (
            lambda: run.load_state("swapped"),
            lambda: client.create_training_run(lora_rank=2, from_checkpoint=f"{run.run_id}/swapped"),
        ):
            with pytest.raises(APIStatusError) as err:
                attempt()
            assert err.value.status_code == 422 and "not inside the data directory" in str(err.value)

        # The whole run folder replaced by a symlink: loads and saves through it are refused.
        other = client.create_training_run(lora_rank=2)
        other.save_state("o").result(timeout=60)
        other_root = data_dir / "checkpoints" / other.run_id
        shutil.move(other_root, outside / "moved")
        other_root.symlink_to(outside / "moved", target_is_directory=True)
        with pytest.raises(APIStatusError) as err:
            other.load_state("o")
        assert err.value.status_code == 422 and "not inside the data directory" in str(err.value)
        with pytest.raises(APIStatusError) as err:
            other.save_state("escape")
        assert err.value.status_code == 422 and "not inside the data directory" in str(err.value)
        assert not (outside / "moved" / "escape").exists()

        assert run.load_state("real").result(timeout=60)["step"] == 1  # the real one still loads
        assert train(run, 1) == [2]


# ------------------------------------------------- a listed checkpoint whose files are gone
def test_a_listed_checkpoint_whose_files_are_gone_is_reported_missing(make_server, tmp_path):
    data_dir = tmp_path / "data"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run(lora_rank=2)
        run.save_state("gone").result(timeout=60)
        shutil.rmtree(data_dir / "checkpoints" / run.run_id / "gone")  # e.g. an operator's rm
        for attempt in (
            lambda: run.load_state("gone"),
            lambda: client.create_training_run(lora_rank=2, from_checkpoint=f"{run.run_id}/gone"),
        ):
            with pytest.raises(APIStatusError) as err:
                attempt()
            assert err.value.status_code == 404, err.value
            assert f"checkpoint {run.run_id}/gone is listed but its files are gone" in str(err.value)
        server.service.delete_checkpoint("default", run.run_id, "gone")  # it can still be unlisted
        assert run.info().checkpoints == []


# ------------------------------------------------------------ an interrupted run creation
def test_interrupted_run_creation_is_dropped_and_its_retry_succeeds(make_server, tmp_path):
    """A crash while create_run's job was pending: the client never got the run id, so the run
    must not come back as a live run nobody knows of; the SDK's retry (same Idempotency-Key)
    after the restart creates the run instead of replaying the interrupted failure."""
    from eztinker.server.service import _request_hash
    from eztinker.types import CreateRunRequest, LoraConfig

    data_dir = tmp_path / "data"
    body = {"lora": {"rank": 2}, "seed": 5}
    with make_server(data_dir=data_dir) as server:
        store = server.service.store
        # What a SIGKILL right after the run row and its job were recorded leaves behind.
        digest = _request_hash("create_run", None, CreateRunRequest.model_validate(body))
        store.add_run("run_ghost", "default", server.service.default_model, LoraConfig(rank=2), 5)
        store.add_job("job_ghostcreate", "default", "run_ghost", "create_run", "create-key", digest)

    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        assert client.list_runs() == []
        job = client.job("job_ghostcreate")
        assert job.status.value == "failed" and "interrupted" in job.error
        first = httpx.post(f"{server.url}/v1/runs", json=body, headers={"Idempotency-Key": "create-key"})
        assert first.status_code == 201, first.text
        again = httpx.post(f"{server.url}/v1/runs", json=body, headers={"Idempotency-Key": "create-key"})
        assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
        assert [r.id for r in client.list_runs()] == [first.json()["id"]]
        assert train(client.training_client(first.json()["id"]), 1) == [1]


# ------------------------------------------------------------------- no code from a checkpoint
def test_a_pickle_planted_in_a_checkpoint_is_never_executed(make_server, tmp_path):
    """Clients cannot upload files, and what the server reads back from its own data directory
    is loaded with weights_only=True / safetensors: a planted pickle fails the load, cleanly."""
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data_dir = tmp_path / "data"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run(lora_rank=2)
        train(run, 1)
        run.save_state("c").result(timeout=60)
        (data_dir / "checkpoints" / run.run_id / "c" / "optimizer.pt").write_bytes(pickle.dumps(Exploit()))
        with pytest.raises(JobFailedError, match="optimizer.pt"):
            run.load_state("c").result(timeout=60)
        with pytest.raises(APIStatusError) as err:
            client.create_training_run(lora_rank=2, from_checkpoint=f"{run.run_id}/c")
        assert err.value.status_code == 422
        assert not marker.exists()
        assert train(run, 1) == [2]
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        assert not marker.exists()  # nor at start-up, restoring the run from that checkpoint
        assert client.training_client(run.run_id).info().step == 0


# ----------------------------------------------------------- a database locked by another process
def test_a_locked_database_gives_503_and_the_worker_records_once_it_is_free(make_server, tmp_path):
    """Another connection holds the SQLite write lock (as an operator's `sqlite3` shell does) while
    a job finishes: submissions answer 503 with Retry-After (the SDK retries them), /health says
    the worker is stalled, and once the lock is gone the job is recorded and the queue runs on."""
    data_dir = tmp_path / "data"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run(lora_rank=2)
        engine = server.service.backend.engine(server.service.default_model)
        real, gate = engine.forward_backward, threading.Event()

        def forward_backward(*args, **kwargs):
            gate.wait(30)
            return real(*args, **kwargs)

        engine.forward_backward = forward_backward
        running, queued = run.forward_backward([EXAMPLE]), run.optim_step(FAST)
        assert wait_status(client, running.job_id, ("running",)) == "running"
        locker = sqlite3.connect(data_dir / "eztinker.sqlite3", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            gate.set()  # the job finishes while the database is locked
            started = time.monotonic()
            refused = httpx.post(f"{server.url}/v1/runs/{run.run_id}/optim_step", json={"adam_params": {}})
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "2" and "database is locked" in refused.json()["detail"]
            assert time.monotonic() - started < 5
            deadline = time.monotonic() + 10  # the worker's first attempt waits out the busy timeout
            while (health := httpx.get(f"{server.url}/health").json())[
                "worker"
            ] == "ok" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert health["status"] == "degraded" and health["worker"].startswith("stalled: the database is locked")
        finally:
            locker.rollback()
            locker.close()
        assert running.result(timeout=30).loss > 0 and queued.result(timeout=30).step == 1
        with ServiceClient(server.url, max_retries=3) as retrying:  # the SDK's retries get through
            assert retrying.training_client(run.run_id).optim_step(FAST).result(timeout=30).step == 2
        health = client.health()
        assert (health.status, health.worker) == ("ok", "ok")


def test_a_locked_database_answers_every_waiting_write_within_the_documented_bound(make_server, tmp_path):
    """docs/reliability.md: a request that must write waits at most BUSY_TIMEOUT_SECONDS (2 s) for
    a locked database. Five writes at once were answered after 2, 4, ... s (each queued behind the
    previous one's wait on the store's one connection); reads were held up behind them too."""
    from eztinker.server.store import BUSY_TIMEOUT_SECONDS

    data_dir = tmp_path / "data"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run(lora_rank=2)
        locker = sqlite3.connect(data_dir / "eztinker.sqlite3", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        answers: list[tuple[int, float]] = []

        def write() -> None:
            started = time.monotonic()
            response = httpx.post(f"{server.url}/v1/runs/{run.run_id}/optim_step", json={"adam_params": {}}, timeout=30)
            answers.append((response.status_code, time.monotonic() - started))

        try:
            threads = [threading.Thread(target=write) for _ in range(5)]
            for thread in threads:
                thread.start()
            time.sleep(0.3)
            started = time.monotonic()
            assert httpx.get(f"{server.url}/v1/runs/{run.run_id}", timeout=30).json()["step"] == 0
            read_seconds = time.monotonic() - started
            for thread in threads:
                thread.join(30)
        finally:
            locker.rollback()
            locker.close()
        print(
            f"\nlocked database: 5 writes answered {sorted(round(t, 2) for _, t in answers)} s; a read "
            f"{read_seconds:.3f} s"
        )
        assert [status for status, _ in answers] == [503] * 5
        # The bound, plus what a loaded 2-core machine adds to a request's own time.
        assert max(t for _, t in answers) < BUSY_TIMEOUT_SECONDS + 0.75, answers
        assert read_seconds < 0.5  # reads do not wait on writes
        assert run.optim_step(FAST).result(timeout=30).step == 1  # and writes go through once it is free


def test_a_save_is_answered_after_the_runs_load_snapshots_are_dropped(make_server, tmp_path, monkeypatch):
    """A save's job is finished in the store from its commit (the save becomes the run's restore
    point, crash-safely), and the run's load snapshots are dropped after that commit: a client
    whose poll arrives in between is answered once they are gone, not while they are still on disk."""
    from eztinker.server.outcomes import OutcomeRecorder

    drop = OutcomeRecorder.drop_snapshots

    def slow_drop(self, run_id, keep=None):
        time.sleep(0.6)  # a slow disk: the poll below arrives between the commit and the drop
        drop(self, run_id, keep)

    data_dir = tmp_path / "data"
    with make_server(data_dir=data_dir) as server, ServiceClient(server.url, max_retries=0) as client:
        source, loader = client.create_training_run(lora_rank=2), client.create_training_run(lora_rank=2, seed=1)
        source.save_state("c1").result(timeout=60)
        loader.load_state(f"{source.run_id}/c1").result(timeout=60)
        assert any((data_dir / "snapshots" / loader.run_id).iterdir())
        monkeypatch.setattr(OutcomeRecorder, "drop_snapshots", slow_drop)
        saving = loader.save_state("own")  # the client polls only in result()
        time.sleep(0.3)  # the save has committed by now; its run's snapshots are being dropped
        assert saving.result(timeout=60).step == 0
        assert not any((data_dir / "snapshots" / loader.run_id).iterdir())


def test_health_reports_a_dead_worker(make_server):
    with make_server() as server, ServiceClient(server.url, max_retries=0) as client:
        run = client.create_training_run(lora_rank=2)

        def broken(job_id):
            raise sqlite3.DatabaseError("database disk image is malformed")

        server.service.store.mark_started = broken
        run.forward_backward([EXAMPLE])
        deadline = time.monotonic() + 10
        while (response := httpx.get(f"{server.url}/health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "degraded"
        assert body["worker"] == "stopped: DatabaseError: database disk image is malformed"


# ------------------------------------------------------------------ an out-of-memory job
def test_out_of_memory_in_one_job_fails_it_alone(make_server):
    """A job that runs out of memory (simulated: the engine raises MemoryError for one run)
    fails with a clear error; the other runs' jobs queued around it complete; the server
    stays up, and the failed run itself works again afterwards."""
    with make_server() as server, ServiceClient(server.url, max_retries=0) as client:
        victim, bystander = client.create_training_run(lora_rank=2), client.create_training_run(lora_rank=2, seed=1)
        engine = server.service.backend.engine(server.service.default_model)
        real = engine.forward_backward

        def forward_backward(run_id, data, loss_fn="cross_entropy", **options):
            if run_id == victim.run_id and len(data[0].model_input.tokens) > 500:
                raise MemoryError("simulated: could not allocate 40 GiB")
            return real(run_id, data, loss_fn, **options)

        engine.forward_backward = forward_backward
        around = [bystander.forward_backward([EXAMPLE]), bystander.optim_step(FAST)]
        failing = victim.forward_backward(slow_batch(600))
        around += [bystander.forward_backward([EXAMPLE]), bystander.optim_step(FAST)]
        with pytest.raises(JobFailedError) as err:
            failing.result(timeout=60)
        assert "MemoryError" in err.value.error and "40 GiB" in err.value.error
        assert [f.result(timeout=60) is not None for f in around] == [True] * 4
        assert bystander.info().step == 2
        assert client.health().status == "ok"
        assert train(victim, 1) == [1]


# --------------------------------------------------------- the training curve after a SIGKILL
def test_the_training_curve_shows_each_step_once_after_a_sigkill(start_server, tmp_path):
    """Steps logged after the last save belong to the life the crash ended: the run restarts
    from its checkpoint and re-runs them, and its curve must not count them twice."""
    data_dir, port = tmp_path / "data", free_port()
    server = start_server(data_dir, port)
    with ServiceClient(server.url, max_retries=8) as client:
        run = client.create_training_run(lora_rank=2, seed=0)
        train(run, 2)
        assert run.save_state("saved").result(timeout=60).step == 2
        train(run, 2)  # steps 3 and 4: lost by the crash
        tokens = run.metrics().points[0].num_tokens
        assert [p.step for p in run.metrics().points] == [1, 2, 3, 4]
        server.kill()
        assert server.process.returncode == -signal.SIGKILL

        server = start_server(data_dir, port)
        assert run.info().step == 2
        assert [p.step for p in run.metrics().points] == [1, 2]
        assert train(run, 1) == [3]
        points = run.metrics().points
        assert [p.step for p in points] == [1, 2, 3]
        assert points[2].num_tokens == tokens and points[2].grad_norm is not None  # one life's batch, not two
    server.kill()
