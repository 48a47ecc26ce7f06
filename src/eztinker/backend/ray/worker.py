"""The Ray actor that computes: one base model in a `LocalBackend` of its own, with the adapters
and optimizer states of the runs placed on it. torch, transformers and peft are imported here,
inside the actor's process, never in the API process."""

from __future__ import annotations

import gc
import os
import queue
import threading
from pathlib import Path

import ray

from .. import InvalidInput


@ray.remote(concurrency_groups={"light": 2})  # type: ignore[call-overload]  # ray's stubs omit concurrency_groups
class EngineWorker:
    """Model work (`execute`) runs in the default group, one call at a time, in order; tokenizer
    work, LoRA and checkpoint checks run in the "light" group, beside it, so a request handler's
    encode never waits behind a training step."""

    def __init__(self):
        self.backend = None
        self._abandoned: dict[str, set[int]] = {}  # call id -> its commands whose consumers are gone

    def load(self, spec: str, cache_dir: str, device: str | None, engine_options: dict | None = None) -> dict:
        """Load the base model (its engine built with `engine_options`); {'info': ModelInfo} or {'error': one line}."""
        from ...engine import ModelLoadError
        from ..local import LocalBackend

        try:
            self.backend = LocalBackend.load([spec], cache_dir=Path(cache_dir), device=device, **(engine_options or {}))
        except ModelLoadError as exc:
            return {"error": str(exc)}
        gc.freeze()  # the model lives as long as the worker: out of the collector's full passes (see cli.server)
        [info] = self.backend.models()
        return {"info": info, "pid": os.getpid()}

    def execute(self, commands: list, call_id: str | None = None) -> list:
        try:
            return self.backend.execute(commands, cancelled=self._polls(call_id, len(commands)))
        finally:
            if call_id is not None:
                self._abandoned.pop(call_id, None)

    def _polls(self, call_id: str | None, count: int) -> list | None:
        """Command i of call `call_id` asks whether `cancel(call_id, i)` came (from the light group)."""
        if call_id is None:
            return None
        abandoned = self._abandoned.setdefault(call_id, set())
        return [(lambda i=i: i in abandoned) for i in range(count)]

    @ray.method(concurrency_group="light")
    def cancel(self, call_id: str, index: int) -> None:
        """Every consumer of command `index` of call `call_id` is gone: it stops at its next step."""
        self._abandoned.setdefault(call_id, set()).add(index)

    @ray.method(concurrency_group="light")
    def call(self, method: str, *args):
        """A light backend method: ('ok', value) or ('invalid', loc, message) (InvalidInput does
        not survive pickling with its fields)."""
        try:
            return "ok", getattr(self.backend, method)(*args)
        except InvalidInput as exc:
            return "invalid", exc.loc, exc.message

    @ray.method(concurrency_group="light")
    def ping(self) -> None:
        """A no-op round trip (the bench's overhead measure)."""

    @ray.method(num_returns="streaming")
    def execute_streaming(self, commands: list, listening: list[bool], call_id: str | None = None):
        """`execute`, yielding ('tokens', i, tokens) as command i's samples decode (for the
        listeners of streaming requests), then ('done', outcomes)."""
        events: queue.Queue = queue.Queue()

        def work() -> None:
            progress = [
                (lambda tokens, i=i: events.put(("tokens", i, tokens))) if on else None
                for i, on in enumerate(listening)
            ]
            try:
                events.put(
                    ("done", self.backend.execute(commands, progress, cancelled=self._polls(call_id, len(commands))))
                )
            except BaseException as exc:  # reaches the caller as this call's error
                events.put(("error", exc))
            finally:
                if call_id is not None:
                    self._abandoned.pop(call_id, None)

        threading.Thread(target=work, name="eztinker-execute", daemon=True).start()
        while True:
            event = events.get()
            if event[0] == "error":
                raise event[1]
            yield event
            if event[0] == "done":
                return
