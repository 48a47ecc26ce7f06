"""One thread for all of a backend's torch work: loading its models, building its engines and
running its commands, whichever thread asks.

Why: PyTorch's CPU kernels run in GNU OpenMP (libgomp) thread teams, one team per thread that
starts parallel work, kept for that thread's life. Once a second thread has started a team,
libgomp manages more threads than there are CPUs and stops letting team threads spin between
parallel regions: they sleep, and each of the thousands of small kernels of a training step waits
for them to wake. Loaded on the main thread and called from a second one (the server's layout
before this thread), SmolLM2 ran `forward_backward` of 4 x 32 tokens 1.45x slower, `optim_step`
3.6x and sampling 4 x 16 tokens 1.69x (bench/compute_thread.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str = "eztinker-compute"):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # no work is handed over after the stop signal
        # A daemon: a command still running at exit must not hold the process (the runner waits
        # at most 30 s for its lanes on shutdown; a job interrupted so is failed on restart).
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, work: Callable[[], T]) -> T:
        """work() on the compute thread (directly when called from it): its result, or its exception."""
        if threading.current_thread() is self._thread:
            return work()
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the backend is closed")
            self._work.put((work, future))
        return future.result()

    def close(self) -> None:
        """Stop once the work already handed over is done."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._work.put(None)

    def _loop(self) -> None:
        while (item := self._work.get()) is not None:
            work, future = item
            try:
                future.set_result(work())
            except BaseException as exc:  # the caller's to handle, as if it had run there
                future.set_exception(exc)
            del work, future, item  # nothing of a finished command outlives it here
