"""Which worker holds which run: least loaded at creation, then sticky until the run is deleted
or its worker is lost. Pure bookkeeping, no Ray: the API process keeps it in memory (a restart
places every run afresh as it rebuilds them)."""

from __future__ import annotations

import threading


class NoLiveWorker(LookupError):
    pass


class Placement:
    def __init__(self, workers: dict[str, str]):
        """`workers`: worker name -> the base model it holds, in start order."""
        self.model_of = dict(workers)
        self._alive = set(workers)
        self._run_worker: dict[str, str] = {}
        self._lock = threading.Lock()

    def place(self, model: str, run_id: str) -> str:
        """The run's worker: its own while that is alive, else the live worker of `model` with
        the fewest runs (the first of them on a tie)."""
        with self._lock:
            current = self._run_worker.get(run_id)
            if current in self._alive:
                return current
            live = self._live(model)
            if not live:
                raise NoLiveWorker(f"no live worker holds base model {model!r}")
            load = {w: 0 for w in live}
            for worker in self._run_worker.values():
                if worker in load:
                    load[worker] += 1
            chosen = min(live, key=lambda w: load[w])
            self._run_worker[run_id] = chosen
            return chosen

    def worker_of(self, run_id: str) -> str | None:
        with self._lock:
            return self._run_worker.get(run_id)

    def live(self, model: str | None = None) -> list[str]:
        """Live workers (of `model`), in start order."""
        with self._lock:
            return self._live(model)

    def _live(self, model: str | None) -> list[str]:
        return [w for w, m in self.model_of.items() if w in self._alive and model in (None, m)]

    def add(self, worker: str, model: str) -> None:
        """A new live worker of `model` (a replacement of a lost one): new runs may go to it."""
        with self._lock:
            self.model_of[worker] = model
            self._alive.add(worker)

    def is_alive(self, worker: str) -> bool:
        with self._lock:
            return worker in self._alive

    def lose(self, worker: str) -> list[str]:
        """Mark `worker` dead; the runs placed on it (they stay placed there until re-placed)."""
        with self._lock:
            self._alive.discard(worker)
            return [run for run, w in self._run_worker.items() if w == worker]

    def runs_on(self, worker: str) -> list[str]:
        with self._lock:
            return [run for run, w in self._run_worker.items() if w == worker]

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._run_worker.pop(run_id, None)
