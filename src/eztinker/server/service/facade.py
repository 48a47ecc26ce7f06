"""The service: validation, ownership, idempotency and job submission, shared by every protocol.

Routers (rest.py, and one module per further protocol) parse their wire format, call this, and
map its errors to their own shapes; they never reach the store, the runner or the backend behind
it. Model work goes to the runner as commands; everything the service needs to know of a model
(vocabulary, tokenizer, LoRA rules, checkpoint format) it asks the backend, so nothing here
imports torch.

`Service` joins its parts, one job each: core.py (state, tokens, job submission), runs.py,
checkpoints.py, work.py (training, sampling, scoring), sessions.py (Tinker sessions), restore.py
(what a start finds after a stop or a crash).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ... import __version__
from ...backend import Backend
from ...types import LOSS_FNS, HealthInfo, WorkerStatus
from ..checkpoints import UrlSigner
from ..datadir import DataDirLock
from ..runner import JobRunner
from ..settings import ServerSettings
from ..store import Store
from .restore import RestorePart
from .runs import RunsPart
from .sessions import SessionsPart
from .work import WorkPart


class Service(RunsPart, WorkPart, SessionsPart, RestorePart):
    """What every router calls: builds the store and the runner over a backend, restores what the
    last server left, and keeps the checkpoint sweep running until `close()`."""

    def __init__(self, settings: ServerSettings, backend: Backend, lock: DataDirLock):
        """`lock`: the data directory's, taken before the models load (so a second server on it
        fails at once); the service holds it until `close()`."""
        self.settings = settings
        self.lock = lock
        self.backend = backend
        self.models = {m.name: m for m in backend.models()}
        self.default_model = next(iter(self.models))
        self.data_dir = Path(settings.data_dir).resolve()
        self.checkpoint_root, self.snapshot_root = settings.checkpoint_root(), settings.snapshot_root()
        self.store = Store(self.data_dir / "eztinker.sqlite3")
        self.runner = JobRunner(
            backend,
            self.store,
            self.data_dir,
            retention=settings.retention(),
            sample_gather_seconds=settings.sample_gather_ms / 1000,
            checkpoint_root=self.checkpoint_root,
            snapshot_root=self.snapshot_root,
            restore_run=self._restore_lost_run,
        )
        self.limits = settings.user_limits()
        self.runner.metrics.watch(self.runner.unfinished, lambda: [run.base_model for run in self.store.live_runs()])
        self.signer = UrlSigner(self.data_dir / "signing.key")
        self._restore()
        self.runner.start()
        self._sweeping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_periodically, name="checkpoint-sweep", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        try:
            self._sweeping.set()
            self.runner.stop(self.settings.shutdown_grace_seconds)
            self.store.close()
            self.backend.close()
        finally:
            self.lock.release()  # last: the next server on this directory finds everything let go

    def health(self) -> HealthInfo:
        worker = self.runner.state
        workers = [
            WorkerStatus(name=w.name, model=w.model, alive=w.alive, runs=list(w.runs)) for w in self.backend.workers()
        ]
        return HealthInfo(
            status="ok" if worker == "ok" else "degraded",
            worker=worker,
            model=self.default_model,
            models=list(self.models),
            runs=len(self.store.live_runs()),
            queued_jobs=self.runner.queued,
            version=__version__,
            workers=workers or None,
        )

    def info(self) -> dict[str, Any]:
        s = self.settings
        default = self.models[self.default_model]
        return {
            "model": default.name,
            "vocab_size": default.vocab_size,
            "stop_token_ids": list(default.stop_token_ids),
            "models": [
                {
                    "name": m.name,
                    "architecture": m.architecture,
                    "vocab_size": m.vocab_size,
                    "max_context_length": m.max_context_length,
                    "stop_token_ids": list(m.stop_token_ids),
                }
                for m in self.models.values()
            ],
            "loss_fns": list(LOSS_FNS),
            "limits": {
                "max_new_tokens": s.max_new_tokens,
                "max_prompt_tokens": s.max_prompt_tokens,
                "max_batch_examples": s.max_batch_examples,
                "max_samples_per_request": s.max_samples_per_request,
                "max_tokens_per_request": s.max_tokens_per_request,
                "max_request_bytes": s.max_request_bytes,
            },
        }
