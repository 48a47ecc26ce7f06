"""Job execution: commands go to the backend off the event loop, one thread per lane (a backend's
engine worker: the local backend has one), each lane in submission order, and every outcome is
recorded in the store.

A request handler validates its input, records a pending job and queues it here with its
command, on the lane the backend names for it (a run's commands always on its run's, so they keep
their order; a snapshot sample on the least busy of its model's). A lane's thread takes its next
command (and the samples of the same base model queued right behind it, which decode as one
batch, even across runs), executes them on the backend and does all of the store's bookkeeping
from the outcomes, in one place. Lanes of different workers run in parallel. When a lane's
worker is lost, its running and queued jobs fail saying so, and its runs are restored on a live
worker (the service's restart path) while their new jobs wait. Waiters long-poll on asyncio
events that the workers set through each waiter's own event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic_writes import fsync
from ..backend import ABANDONED, Backend, Cancelled, Progress, WorkerLost
from ..backend.commands import (
    Command,
    CreateRun,
    DeleteRun,
    ErrorCategory,
    ForwardBackward,
    Load,
    OptimStep,
    Outcome,
    Sample,
    Save,
    fusable,
)
from ..backend.results import (
    ForwardBackwardResult,
    Loaded,
    OptimStepResult,
    RunCreated,
    RunDeleted,
    Saved,
    dump_result,
)
from .limits import FairQueue, InFlight, Refusal, UserLimits
from .metrics import Metrics
from .retention import RetentionPolicy
from .store import INTERRUPTED, CheckpointLifecycle, Store, is_busy

log = logging.getLogger(__name__)

_GATHER_LIMIT = 10  # a sample batch gathers arrivals for at most this many gaps (sample_gather_seconds)
SNAPSHOTS = "snapshots"  # <data_dir>/snapshots/<run_id>/<job_id>: what each run last loaded


@dataclass
class Job:
    id: str
    command: Command
    # '<run_id>/<name>': the checkpoint a save writes, or a load / create_run starts from.
    checkpoint: str | None = None
    # A save's: what its checkpoint's row records beside it (expiry, weights only, ...).
    lifecycle: CheckpointLifecycle | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    # A sample's listener for its tokens as they are decoded (streaming); called from the worker thread.
    progress: Progress | None = None
    owner: str = ""  # the user who submitted it: lanes serve users' queues in turn (limits.FairQueue)
    # Set once every consumer of the job's result is gone (`JobRunner.cancel`): a sample stops decoding.
    abandoned: threading.Event = field(default_factory=threading.Event)
    # Or, asked after every decode step (it must be quick): whether they are gone, e.g. its session ended.
    consumers_gone: Callable[[], bool] | None = None

    def gone(self) -> bool:
        return self.abandoned.is_set() or (self.consumers_gone is not None and self.consumers_gone())


@dataclass
class _Lane:
    """One engine worker's queue, run in order by a thread of its own."""

    key: Hashable
    queue: FairQueue = field(default_factory=FairQueue)
    running: list[Job] = field(default_factory=list)
    lost: str | None = None  # why its worker is gone: every job that reaches it fails with this
    thread: threading.Thread | None = None


def hide_paths(text: str, data_dir: Path, checkpoint_root: Path | None = None) -> str:
    """`text` with the data directory's paths made relative: to its checkpoints folder (a
    checkpoint then reads as its reference, '<run_id>/<name>'), else to itself. Errors reach
    clients, who are not to learn the server's file layout (an OS error names the full path)."""
    checkpoints = checkpoint_root or data_dir / "checkpoints"
    return (
        text.replace(f"{checkpoints}{os.sep}", "")
        .replace(f"{data_dir}{os.sep}", "")
        .replace(str(data_dir), "<data-dir>")
    )


def stored_path(path: Path, data_dir: Path) -> str:
    """How the store records a checkpoint or snapshot directory: relative to the data directory
    when inside it (the data directory can move), else absolute (a shared --checkpoint-dir);
    `data_dir / stored` gives the directory back either way."""
    return str(path.relative_to(data_dir)) if path.is_relative_to(data_dir) else str(path)


class JobRunner:
    def __init__(
        self,
        backend: Backend,
        store: Store,
        data_dir: Path,
        *,
        retention: RetentionPolicy,
        sample_gather_seconds: float = 0.0,
        checkpoint_root: Path | None = None,
        snapshot_root: Path | None = None,
        restore_run: Callable[[str], None] | None = None,
    ):
        """`restore_run(run_id)` rebuilds a run whose worker was lost (on a live one, from its last
        checkpoint), as after a restart."""
        self.backend = backend
        self.store = store
        self.data_dir = data_dir
        self.checkpoint_root = checkpoint_root or data_dir / "checkpoints"
        self.snapshot_root = snapshot_root or data_dir / SNAPSHOTS
        self.retention = retention
        self.sample_gather_seconds = sample_gather_seconds
        self.restore_run = restore_run
        self._lanes: dict[Hashable, _Lane] = {}
        self._parked: dict[str, list[Job]] = {}  # jobs of runs being restored after their worker was lost
        self._cv = threading.Condition()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._waiters_lock = threading.Lock()
        # Jobs whose outcome is being recorded: the store shows them finished from its commit on,
        # but what follows the commit (a save drops the run's load snapshots) is not yet done.
        self._recording: set[str] = set()
        self._started = False
        self._stopping = False
        self._draining = False  # shutting down: no job starts any more
        self._last_expiry = 0.0
        self._expiry_lock = threading.Lock()
        self._stalled: str | None = None  # why a store write is being retried
        self._stopped: str | None = None  # why a worker thread died
        self._in_flight = InFlight()  # each user's unfinished jobs and sampling tokens (per-user limits)
        self.metrics = Metrics()

    def start(self) -> None:
        with self._cv:
            self._started = True
            for lane in self._lanes.values():
                self._start_lane(lane)

    def drain(self) -> None:
        """The server is shutting down: no job starts any more. Every queued job (and any submitted
        from now on) fails at once as interrupted, so its waiter learns it now and a client's retry
        after the restart runs it afresh; running jobs go on (`stop` bounds how long)."""
        with self._cv:
            self._draining = True
            failed = [job for lane in self._lanes.values() for job in lane.queue]
            failed += [job for jobs in self._parked.values() for job in jobs]
            for lane in self._lanes.values():
                lane.queue.clear()
            self._parked.clear()
            self._cv.notify_all()
        for job in failed:
            self._record(job, Outcome.failed(INTERRUPTED))
        if failed:
            log.warning("shutting down: %d queued job(s) failed as interrupted", len(failed))

    def stop(self, timeout: float = 30.0) -> None:
        """Drain, give the running jobs up to `timeout` seconds to finish (running samples are
        cut at the deadline), then stop the lanes. A job still running after that is marked
        interrupted at the next start."""
        self.drain()
        deadline = time.monotonic() + timeout
        with self._cv:
            while any(lane.running for lane in self._lanes.values()) and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(min(left, 0.1))
            running = [job for lane in self._lanes.values() for job in lane.running]
            for job in running:
                job.abandoned.set()  # a sample stops at its next step; other work cannot be cut short
            self._stopping = True
            self._cv.notify_all()
            threads = [lane.thread for lane in self._lanes.values() if lane.thread is not None]
        if running:
            log.warning(
                "shutting down: %d job(s) still running after %.0f s: %s",
                len(running),
                timeout,
                ", ".join(f"{job.id} ({job.command.kind})" for job in running),
            )
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0) + 2.0)

    def admit(self, job: Job, limits: UserLimits) -> Refusal | None:
        """Count the job against its owner's in-flight limits before its row is written, or say
        which limit it would exceed (any thread). Admitted, it counts until its outcome is
        recorded, or `withdraw` if it is never submitted."""
        with self._cv:
            return self._in_flight.admit(job, limits)

    def withdraw(self, job_id: str) -> None:
        with self._cv:
            self._in_flight.release(job_id)

    def submit(self, job: Job) -> None:
        """Queue a job whose row is already in the database (any thread)."""
        with self._cv:
            if not self._draining:
                self._enqueue(job)
                self._cv.notify_all()
                return
        self._record(job, Outcome.failed(INTERRUPTED))  # shutting down: nothing starts

    def _enqueue(self, job: Job) -> None:
        """On its run's lane, or the least busy of the lanes it may take (holding the lock)."""
        if job.command.run_id in self._parked:
            self._parked[job.command.run_id].append(job)
            return
        lanes = [self._lane(key) for key in self.backend.lanes(job.command)]
        min(lanes, key=lambda lane: (lane.lost is not None, len(lane.queue) + len(lane.running))).queue.append(job)

    def _lane(self, key: Hashable) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
            if self._started:
                self._start_lane(lane)
        return lane

    def _start_lane(self, lane: _Lane) -> None:
        if lane.thread is None:
            name = "eztinker-worker" if lane.key is None else f"eztinker-worker-{lane.key}"
            lane.thread = threading.Thread(target=self._work_loop, args=(lane,), name=name, daemon=True)
            lane.thread.start()

    def cancel(self, job_id: str, why: str) -> bool:
        """Every consumer of a queued or running sample is gone: a queued one fails at once with
        `why`, a running one stops decoding at its next step. Whether the sample was found (other
        kinds of job are never cancelled: a training step's effect is wanted whoever waits)."""
        with self._cv:
            for queue in [lane.queue for lane in self._lanes.values()] + list(self._parked.values()):
                for job in queue:
                    if job.id == job_id and isinstance(job.command, Sample):
                        job.abandoned.set()
                        queue.remove(job)
                        break
                else:
                    continue
                break
            else:
                running = next(
                    (
                        job
                        for lane in self._lanes.values()
                        for job in lane.running
                        if job.id == job_id and isinstance(job.command, Sample)
                    ),
                    None,
                )
                if running is not None:
                    running.abandoned.set()
                return running is not None
        self._record(job, Outcome.failed(f"{ABANDONED}: {why}; it never started", ErrorCategory.user))
        return True

    @property
    def queued(self) -> int:
        with self._cv:
            return sum(len(lane.queue) + (1 if lane.running else 0) for lane in self._lanes.values()) + sum(
                len(jobs) for jobs in self._parked.values()
            )

    def unfinished(self) -> list[tuple[str, str]]:
        """(kind, 'pending' | 'running') of every job queued or executing (any thread)."""
        with self._cv:
            pending: list[str] = [job.command.kind for lane in self._lanes.values() for job in lane.queue]
            pending += [job.command.kind for jobs in self._parked.values() for job in jobs]
            running: list[str] = [job.command.kind for lane in self._lanes.values() for job in lane.running]
        return [(kind, "pending") for kind in pending] + [(kind, "running") for kind in running]

    @property
    def state(self) -> str:
        """'ok'; 'stalled: <why>' while a store write is retried; 'stopped: <why>' once the
        worker thread has died (no job will run again: /health answers 503)."""
        if self._stopped is not None:
            return f"stopped: {self._stopped}"
        return "ok" if self._stalled is None else f"stalled: {self._stalled}"

    async def wait(self, job_id: str, timeout: float, finished: Callable[[], bool]) -> None:
        """Return when the job finishes or `timeout` passes, whichever is first. The waiter is
        registered before `finished()` is checked, so a job finishing in between is not missed."""
        if timeout <= 0:
            return
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._waiters_lock:
            self._waiters.setdefault(job_id, []).append(entry)
        try:
            if not finished():
                await asyncio.wait_for(entry[1].wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._waiters_lock:
                entries = self._waiters.get(job_id, [])
                if entry in entries:
                    entries.remove(entry)
                if not entries:
                    self._waiters.pop(job_id, None)

    def settled(self, job_id: str) -> bool:
        """Whether the recording of a finished job is complete (false while its bookkeeping runs)."""
        with self._waiters_lock:
            return job_id not in self._recording

    def _notify_finished(self, job_id: str) -> None:
        with self._waiters_lock:
            entries = list(self._waiters.get(job_id, ()))
        for loop, event in entries:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    # ----------------------------------------------------------------------- worker side
    def _work_loop(self, lane: _Lane) -> None:
        try:
            while True:
                with self._cv:
                    while not lane.queue and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        return
                    batch = lane.running = lane.queue.take(fusable)
                    self._gather(lane, batch)
                self._run(lane, batch)
                self._maybe_expire()
        except BaseException as exc:  # e.g. a database that fails for good: /health must say so
            self._stopped = f"{type(exc).__name__}: {exc}"
            log.exception("the worker stopped; no further job will run")

    def _retrying(self, write: Callable[[], object]) -> None:
        """Run a store write, retrying with backoff for as long as another process holds the
        database's write lock: the outcome is recorded once the lock is gone, never lost."""
        delay, since = 0.05, time.monotonic()
        while True:
            try:
                write()
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or self._stopping:
                    raise
                if self._stalled is None:
                    log.warning("the database is locked by another connection; retrying the worker's write")
                self._stalled = (
                    f"the database is locked by another connection (retrying for {time.monotonic() - since:.0f} s)"
                )
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
            else:
                if self._stalled is not None:
                    log.warning("the database is writable again after %.1f s", time.monotonic() - since)
                self._stalled = None
                return

    def _gather(self, lane: _Lane, batch: list[Job]) -> None:
        """Let a sample batch grow while fusable samples keep arriving (holding the lock): a client
        sending N requests at once (the Tinker SDK sends one per prompt, a few milliseconds apart)
        gets one N-prompt batch, not a 1-prompt batch followed by an (N-1)-prompt one. Gathering
        ends at a quiet gap of `sample_gather_seconds`, when nothing at the head of a user's queue
        may join (FairQueue.join), or `_GATHER_LIMIT` gaps after it began (which bounds the latency it adds)."""
        if not self.sample_gather_seconds or not isinstance(batch[0].command, Sample):
            return
        limit = time.monotonic() + _GATHER_LIMIT * self.sample_gather_seconds
        while not self._stopping:
            deadline = min(time.monotonic() + self.sample_gather_seconds, limit)
            while not lane.queue and not self._stopping and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            if not lane.queue.join(batch, fusable):
                return
            if time.monotonic() >= limit:
                return

    def _run(self, lane: _Lane, batch: list[Job]) -> None:
        lost: WorkerLost | None = None
        try:
            for job in batch:
                self._retrying(functools.partial(self.store.mark_started, job.id))
            started = time.monotonic()
            progress = [None if job.progress is None else _guarded(job.id, job.progress) for job in batch]
            cancelled: list[Cancelled | None] | None = None
            if isinstance(batch[0].command, Sample):
                cancelled = [job.gone for job in batch]
            try:
                if lane.lost is not None:
                    outcomes = [Outcome.failed(lane.lost)] * len(batch)
                else:
                    outcomes = self.backend.execute(
                        [job.command for job in batch],
                        progress=progress if any(progress) else None,
                        lane=lane.key,
                        cancelled=cancelled,
                    )
            except WorkerLost as exc:
                lost, outcomes = exc, []  # recorded once its runs are back (below)
            except Exception as exc:  # a backend that failed as a whole fails these jobs alone
                log.exception("backend failed")
                outcomes = [Outcome.failed(f"{type(exc).__name__}: {exc}")] * len(batch)
            finished = time.monotonic()
            if isinstance(batch[0].command, Sample):
                self.metrics.sample_batch_requests.observe(len(batch))
            for job, outcome in zip(batch, outcomes):
                self._record(job, outcome)
                try:
                    self.metrics.job_finished(job.command, outcome, started - job.submitted_at, finished - started)
                except Exception:  # metrics must never fail a job
                    log.exception("could not record metrics of job %s", job.id)
            if lost is not None:
                self._worker_lost(lane, lost, batch)
        finally:
            with self._cv:
                lane.running = []
                self._cv.notify_all()  # a stop() waiting for running jobs

    def _worker_lost(self, lane: _Lane, lost: WorkerLost, batch: list[Job]) -> None:
        """Rebuild each of the lane's runs on a live worker (as after a restart), then fail its
        running and queued jobs with the loss: a client that sees the failure finds its run back.
        A run's jobs submitted meanwhile wait, and then go to its new lane."""
        log.error("%s", lost)
        with self._cv:
            lane.lost = str(lost)
            for run_id in lost.runs:
                self._parked.setdefault(run_id, [])
        for run_id in lost.runs:
            try:
                if self.restore_run is not None:
                    self.restore_run(run_id)
            except Exception:
                log.exception("run %s could not be restored after its worker was lost", run_id)
        with self._cv:
            failed = batch + list(lane.queue)
            lane.queue.clear()
        for job in failed:
            self._record(job, Outcome.failed(str(lost)))
        with self._cv:
            for run_id in lost.runs:
                for job in self._parked.pop(run_id, []):
                    self._enqueue(job)
            self._cv.notify_all()

    def _record(self, job: Job, outcome: Outcome) -> None:
        with self._waiters_lock:
            self._recording.add(job.id)
        try:
            self._retrying(lambda: self._store_outcome(job, outcome))
        except Exception as exc:  # e.g. a result that is not JSON-serialisable
            log.exception("could not record job %s", job.id)
            error = f"could not record the result: {exc}"
            self._retrying(lambda: self.store.mark_finished(job.id, error=error))
        finally:
            with self._waiters_lock:
                self._recording.discard(job.id)
            self.withdraw(job.id)
        self._notify_finished(job.id)

    def _store_outcome(self, job: Job, outcome: Outcome) -> None:
        """The store's bookkeeping for a finished command (idempotent: it may be retried). A save
        or load commits its effect on the run and the job's completion in one transaction: a
        SIGKILL between separate commits would leave, e.g., a listed checkpoint whose job says
        'its effect was not applied'."""
        command = job.command
        if outcome.error is not None:
            error = hide_paths(outcome.error, self.data_dir, self.checkpoint_root)
            self.store.mark_finished(job.id, error=error, error_category=outcome.error_category)
            if isinstance(command, CreateRun):
                self.store.mark_run_deleted(command.run_id)  # the run never came to be
        elif isinstance(command, Save):
            assert job.checkpoint is not None, "a save's job names the checkpoint it writes"
            relative = stored_path(Path(command.directory), self.data_dir)
            name = job.checkpoint.split("/")[1]
            step = outcome.result(Saved).step
            self.store.record_save(job.id, command.run_id, name, relative, step, job.lifecycle)
            if command.with_optimizer:
                self._drop_snapshots(command.run_id)  # it restores from its own save now
        elif isinstance(command, (Load, CreateRun)) and job.checkpoint is not None:
            source = command.directory if isinstance(command, Load) else command.from_checkpoint
            assert source is not None, "a create_run's job names a checkpoint only when it starts from one"
            snapshot = self._snapshot(command.run_id, job.id, Path(source))
            result: Loaded | RunCreated
            if isinstance(command, Load):
                result = Loaded(step=outcome.result(Loaded).step, restored_from=job.checkpoint)
            else:
                result = outcome.result(RunCreated)
            self.store.record_load(job.id, command.run_id, result.step, job.checkpoint, dump_result(result), snapshot)
            self._drop_snapshots(command.run_id, keep=job.id)
        elif isinstance(command, DeleteRun):
            self.store.mark_finished(job.id, result=dump_result(outcome.result(RunDeleted)))
            self._drop_snapshots(command.run_id)
        elif isinstance(command, OptimStep):
            self.store.record_step(job.id, command.run_id, outcome.result(OptimStepResult).model_dump())
        elif isinstance(command, ForwardBackward) and not command.forward_only:
            trained = outcome.result(ForwardBackwardResult)
            self.store.record_forward_backward(
                job.id, command.run_id, dump_result(trained), trained.loss, trained.num_tokens, _weight_sum(command)
            )
        else:
            self.store.mark_finished(job.id, result=dump_result(outcome.unwrap()))

    def _snapshot(self, run_id: str, job_id: str, source: Path) -> str:
        """A private copy, by hard links, of the checkpoint a run just loaded; after a restart the
        run restores from it, so it comes back as exactly what it loaded whatever happens to the
        source (overwritten by its run's next save, deleted). Hard links cost no space while the
        source exists: a save writes new files and renames them in, never rewriting old ones.
        Returns its path relative to the data directory; it counts once the store records it."""
        target = self.snapshot_root / run_id / job_id
        target.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if file.is_file() and not (target / file.name).exists():
                try:
                    os.link(file, target / file.name)
                except OSError:  # a file system without hard links: copy
                    shutil.copy2(file, target / file.name)
                    fsync(target / file.name)
        for directory in (target, target.parent, target.parent.parent):  # durable before it is recorded
            fsync(directory)
        return stored_path(target, self.data_dir)

    def _drop_snapshots(self, run_id: str, keep: str | None = None) -> None:
        folder = self.snapshot_root / run_id
        for path in folder.iterdir() if folder.is_dir() else ():
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry > 60 and self._expiry_lock.acquire(blocking=False):  # one lane expires
            try:
                self._last_expiry = now
                self._retrying(lambda: self.store.expire(self.retention))
            finally:
                self._expiry_lock.release()


def _weight_sum(command: ForwardBackward) -> float | None:
    """cross_entropy's summed weights over the batch (a datum without weights weighs 1 at every
    position): its weighted loss over this is the mean NLL per token, whether the weights are
    ones or already normalised to sum to 1. None for the other losses (no weights)."""
    if command.loss_fn != "cross_entropy":
        return None
    total = 0.0
    for datum in command.data:
        weights = datum.loss_fn_inputs.weights
        total += len(datum.loss_fn_inputs.target_tokens) if weights is None else _total(weights)
    return total


def _total(values) -> float:
    return float(sum(_total(v) if isinstance(v, (list, tuple)) else v for v in values))


def _guarded(job_id: str, listener: Progress) -> Progress:
    """A listener that fails (its event loop closed, say) stops listening; the sample goes on."""
    broken = False

    def listen(tokens) -> None:
        nonlocal broken
        if not broken:
            try:
                listener(tokens)
            except Exception:
                broken = True
                log.exception("job %s: its progress listener failed; it gets no more progress", job_id)

    return listen
