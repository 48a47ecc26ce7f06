"""Job execution: one worker thread runs model work in submission order, off the event loop.

A request handler validates its input, records a pending job and returns its id at once; the
worker executes it and records the result or error; waiters long-poll on an asyncio.Event.
Consecutive sample jobs at the head of the queue are fused into one batched generation, even
across runs (each row decodes with its own adapter).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, EngineError, SampleSpec
from .store import Store

log = logging.getLogger(__name__)


@dataclass
class Job:
    id: str
    run_id: str | None
    kind: str
    # Runs on the worker thread; returns the JSON-able result. Sample jobs leave it None and
    # give `sample_spec` + `finish_sample` instead, so the worker can batch them together.
    work: Callable[[], Any] | None = None
    sample_spec: SampleSpec | None = None
    finish_sample: Callable[[Any], Any] | None = None
    submitted_at: float = field(default_factory=time.monotonic)


class JobRunner:
    def __init__(self, engine: Engine, store: Store, *, job_ttl_seconds: float, max_finished_jobs: int):
        self.engine = engine
        self.store = store
        self.job_ttl_seconds = job_ttl_seconds
        self.max_finished_jobs = max_finished_jobs
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_expiry = 0.0
        self.busy_job: str | None = None

    # ------------------------------------------------------------------- event-loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._work_loop, name="eztinker-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Called on the event loop after the job's row is in the database."""
        self._events[job.id] = asyncio.Event()
        with self._cv:
            self._queue.append(job)
            self._cv.notify()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def queued(self) -> int:
        return len(self._queue) + (1 if self.busy_job else 0)

    async def wait(self, job_id: str, timeout: float) -> None:
        """Return when the job finishes or `timeout` passes, whichever is first."""
        event = self._events.get(job_id)
        if event is None or timeout <= 0:
            return
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _notify_finished(self, job_id: str) -> None:
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()

    # ----------------------------------------------------------------------- worker side
    def _work_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                batch = self._take_batch()
            self._run(batch)
            self._maybe_expire()

    def _take_batch(self) -> list[Job]:
        batch = [self._queue.popleft()]
        if batch[0].sample_spec is not None:
            # Samples queued back to back decode together (one run's jobs never reorder:
            # everything taken here was queued contiguously).
            while self._queue and self._queue[0].sample_spec is not None:
                batch.append(self._queue.popleft())
        return batch

    def _run(self, batch: list[Job]) -> None:
        for job in batch:
            self.store.mark_started(job.id)
        self.busy_job = batch[0].id
        try:
            if batch[0].sample_spec is not None:
                self._run_samples(batch)
            else:
                job = batch[0]
                self._finish(job, *self._call(job.work))
        finally:
            self.busy_job = None

    def _run_samples(self, batch: list[Job]) -> None:
        results, error = self._call(lambda: self.engine.sample([job.sample_spec for job in batch]))
        if error is not None and len(batch) > 1:
            # One bad request must not fail its neighbours: retry each alone.
            for job in batch:
                self._finish(job, *self._call(lambda j=job: self.engine.sample([j.sample_spec])[0]), finish=job.finish_sample)
            return
        for i, job in enumerate(batch):
            self._finish(job, results[i] if error is None else None, error, finish=job.finish_sample)

    @staticmethod
    def _call(work: Callable[[], Any]) -> tuple[Any, str | None]:
        try:
            return work(), None
        except EngineError as exc:
            return None, str(exc)
        except Exception as exc:  # a failing job fails alone; the server keeps serving
            log.exception("job failed")
            return None, f"{type(exc).__name__}: {exc}"

    def _finish(self, job: Job, result: Any, error: str | None, finish: Callable[[Any], Any] | None = None) -> None:
        if error is None and finish is not None:
            result, error = self._call(lambda: finish(result))
        try:
            self.store.mark_finished(job.id, result=result, error=error)
        except Exception as exc:  # e.g. a result that is not JSON-serialisable
            log.exception("could not record job %s", job.id)
            self.store.mark_finished(job.id, error=f"could not record the result: {exc}")
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._notify_finished, job.id)

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry > 60:
            self._last_expiry = now
            self.store.expire_jobs(self.job_ttl_seconds, self.max_finished_jobs)
