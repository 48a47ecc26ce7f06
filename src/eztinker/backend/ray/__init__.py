"""The Ray backend: the engines run in Ray actors (`worker.py`), each holding one base model and
the runs placed on it, several per model if asked, on any node of a Ray cluster. This process
(the API) keeps only the placement of runs on workers (`placement.py`) and imports no torch.

A run's commands go to its worker, in order (one runner lane per worker); a bare-model or
snapshot sample may go to any worker of its model. A worker that dies (killed, its node lost)
raises WorkerLost for the command that finds it so; the runner then fails its jobs and restores
its runs on live workers from their last checkpoint, which every worker reads from the shared
checkpoint directory. A replacement worker of the same model is started at once, in the
background (`_replace`), so the cluster's capacity comes back without a restart.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...types import LoraConfig, Prompt
from .. import Cancelled, CheckpointState, InvalidInput, ModelInfo, Progress, WorkerInfo, WorkerLost
from ..commands import Command, CreateRun, DeleteRun, Outcome, Sample, ScorePrompts
from .placement import NoLiveWorker, Placement

log = logging.getLogger(__name__)

NAMESPACE = "eztinker"
_CANCEL_POLL_SECONDS = 0.2  # how often a call's cancellations are looked for while it runs without streaming


class _Cancels:
    """A call's cancellable commands: forwards each newly abandoned one to the worker, once."""

    def __init__(self, worker: _Worker, cancelled: Sequence[Cancelled | None]):
        self.worker, self.cancelled = worker, cancelled
        self.sent: set[int] = set()  # indices of the commands already forwarded as abandoned
        self.call_id = uuid.uuid4().hex

    def forward(self) -> None:
        for i, cancelled in enumerate(self.cancelled):
            if cancelled is not None and i not in self.sent and cancelled():
                self.sent.add(i)
                self.worker.actor.cancel.remote(self.call_id, i)


class RayStartError(RuntimeError):
    """The Ray backend cannot start (no cluster at the address, too few resources, a model that
    does not load); the message is one line."""


@dataclass(frozen=True)
class _Worker:
    name: str  # its Ray actor's name, in namespace "eztinker"
    model: str
    actor: Any


@dataclass(frozen=True)
class _Respawn:
    """How the workers were started, to start a replacement of a lost one the same way."""

    specs: dict[str, str]  # model name -> the spec it was loaded from
    cache_dir: str
    device: str | None
    cpus: float
    gpus: float
    engine_options: dict
    job: str


_REPLACE_ATTEMPTS = 5  # a replacement that cannot start (no resources yet, a node coming back) is retried


class RayBackend:
    def __init__(
        self, workers: Sequence[_Worker], models: Sequence[ModelInfo], owns_ray: bool, respawn: _Respawn | None = None
    ):
        self._owns_ray = owns_ray  # it connected this process to Ray, so it disconnects at close
        self._respawn = respawn  # None: lost workers are not replaced
        self._replaced: set[str] = set()
        self._replacements = itertools.count(1)
        self._closing = False
        self._lock = threading.Lock()
        # Replaced as a whole (never mutated) when a replacement joins: readers need no lock.
        self._workers = {w.name: w for w in workers}
        self._models = list(models)
        self._placement = Placement({w.name: w.model for w in workers})
        self._tokenizer_files: dict[str, dict[str, str]] = {}

    @classmethod
    def start(
        cls,
        workers_of: dict[str, int],
        *,
        address: str | None,
        cache_dir: Path,
        device: str | None,
        cpus: float,
        gpus: float | None,
        engine_options: dict | None = None,
    ) -> RayBackend:
        """Join the cluster at `address` (None: start a Ray instance on this machine), start
        `workers_of[spec]` workers for each base model spec and wait until each has loaded it. A
        process already connected to Ray (a benchmark, say) stays on its cluster."""
        import ray

        owns_ray = not ray.is_initialized()
        if owns_ray:
            _check_reachable(address)
            try:
                ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
            except Exception as exc:  # ConnectionError, or Ray's own for a malformed address
                raise RayStartError(f"cannot reach the Ray cluster at {address}: {_one_line(exc)}") from None
        try:
            return cls._start_workers(
                workers_of,
                cache_dir=cache_dir,
                device=device,
                cpus=cpus,
                gpus=gpus,
                owns_ray=owns_ray,
                engine_options=engine_options or {},
            )
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise

    @classmethod
    def _start_workers(
        cls,
        workers_of: dict[str, int],
        *,
        cache_dir: Path,
        device: str | None,
        cpus: float,
        gpus: float | None,
        owns_ray: bool,
        engine_options: dict | None = None,
    ) -> RayBackend:
        import ray

        from .worker import EngineWorker

        resources = ray.cluster_resources()
        gpus = (1 if resources.get("GPU", 0) else 0) if gpus is None else gpus
        count = sum(workers_of.values())
        for kind, each, have in (("CPU", cpus, resources.get("CPU", 0)), ("GPU", gpus, resources.get("GPU", 0))):
            if each * count > have:  # the actors would wait for them for ever
                raise RayStartError(
                    f"{count} Ray workers x {each:g} {kind}s need {each * count:g} {kind}s; the "
                    f"cluster has {have:g} (see --workers-per-model, --worker-cpus, --worker-gpus)"
                )
        job = ray.get_runtime_context().get_job_id()
        actors: list[tuple[str, str, Any]] = []
        for spec, n in workers_of.items():
            for i in range(n):
                name = f"{Path(spec).name or spec}#{i}@{job}"
                try:
                    # ray.remote made EngineWorker an ActorClass; ray's stubs keep the plain class's type.
                    actor = EngineWorker.options(  # type: ignore[attr-defined]
                        name=name, namespace=NAMESPACE, num_cpus=cpus, num_gpus=gpus
                    ).remote()
                except ValueError as exc:  # the name is taken
                    raise RayStartError(f"cannot start Ray worker {name}: {_one_line(exc)}") from None
                actors.append((spec, name, actor))
        loaded = []
        for (spec, name, _actor), ref in zip(
            actors, [a.load.remote(s, str(cache_dir), device, engine_options or {}) for s, _, a in actors]
        ):
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise RayStartError(f"Ray worker {name} could not start: {_one_line(exc)}") from None
            if "error" in answer:
                raise RayStartError(answer["error"])
            loaded.append(answer["info"])
            log.info("Ray worker %s holds %s (pid %s)", name, spec, answer["pid"])
        workers = [_Worker(name, info.name, actor) for (_, name, actor), info in zip(actors, loaded)]
        models = list({info.name: info for info in loaded}.values())
        respawn = _Respawn(
            {info.name: spec for (spec, _, _), info in zip(actors, loaded)},
            str(cache_dir),
            device,
            cpus,
            gpus,
            dict(engine_options or {}),
            str(job),
        )
        return cls(workers, models, owns_ray, respawn)

    def models(self) -> list[ModelInfo]:
        return list(self._models)

    def workers(self) -> list[WorkerInfo]:
        return [
            WorkerInfo(name, w.model, self._placement.is_alive(name), tuple(self._placement.runs_on(name)))
            for name, w in self._workers.items()
        ]

    # ------------------------------------------------------------------------- model work
    def lanes(self, command: Command) -> Sequence[Hashable]:
        model = command.model
        snapshot = isinstance(command, (Sample, ScorePrompts)) and command.snapshot is not None
        if snapshot or command.run_id is None:  # a snapshot or the bare model: any of its workers holds those
            return self._placement.live(model) or self._of_model(model)
        if not isinstance(command, CreateRun) and (worker := self._placement.worker_of(command.run_id)):
            return [worker]
        try:
            return [self._placement.place(model, command.run_id)]
        except NoLiveWorker:
            return self._of_model(model)[:1]  # a dead lane: the job fails saying its worker is gone

    def execute(
        self,
        commands: Sequence[Command],
        progress: Sequence[Progress | None] | None = None,
        lane: Hashable = None,
        cancelled: Sequence[Cancelled | None] | None = None,
    ) -> list[Outcome]:
        import ray

        key = lane if lane is not None else self.lanes(commands[0])[0]
        if not isinstance(key, str):  # this backend's lanes are its workers' names
            raise TypeError(f"not a Ray worker's lane: {key!r}")
        worker = self._workers[key]
        if not self._placement.is_alive(worker.name):
            raise self._lost(worker, "it was found dead")
        listening = [p is not None for p in progress] if progress is not None else []
        # A call with cancellable commands gets an id the worker's `cancel` names it by.
        watch = _Cancels(worker, cancelled) if cancelled is not None and any(cancelled) else None
        try:
            if progress is not None and any(listening):
                outcomes = self._stream(worker, commands, listening, progress, watch)
            elif watch is not None:
                ref = worker.actor.execute.remote(list(commands), watch.call_id)
                while not ray.wait([ref], timeout=_CANCEL_POLL_SECONDS)[0]:
                    watch.forward()
                outcomes = ray.get(ref)
            else:
                outcomes = ray.get(worker.actor.execute.remote(list(commands)))
        except ray.exceptions.RayActorError as exc:
            self._placement.lose(worker.name)
            self._replace(worker)
            raise self._lost(worker, _death(exc)) from None
        for command, outcome in zip(commands, outcomes):
            if isinstance(command, (DeleteRun, CreateRun)):
                deleted = isinstance(command, DeleteRun) and outcome.error is None
                if deleted or (isinstance(command, CreateRun) and outcome.error is not None):  # or never created
                    self._placement.forget(command.run_id)
        return outcomes

    @staticmethod
    def _stream(
        worker: _Worker,
        commands: Sequence[Command],
        listening: list[bool],
        progress: Sequence[Progress | None],
        watch: _Cancels | None,
    ) -> list[Outcome]:
        import ray

        call_id = None if watch is None else watch.call_id
        for ref in worker.actor.execute_streaming.remote(list(commands), listening, call_id):
            event = ray.get(ref)
            if event[0] == "tokens":
                progress[event[1]](event[2])
                if watch is not None:  # tokens arrive after every decode step
                    watch.forward()
            else:
                return event[1]
        raise RuntimeError(f"Ray worker {worker.name} ended a call without its outcomes")

    def _replace(self, lost: _Worker) -> None:
        """Start a worker of `lost`'s model in its place, in the background (loading a model takes
        seconds to minutes); it joins the placement once loaded. Once per lost worker."""
        with self._lock:
            if self._respawn is None or self._closing or lost.name in self._replaced:
                return
            self._replaced.add(lost.name)
        threading.Thread(
            target=self._start_replacement, args=(lost,), name=f"eztinker-replace-{lost.name}", daemon=True
        ).start()

    def _start_replacement(self, lost: _Worker) -> None:
        import ray

        from .worker import EngineWorker

        respawn = self._respawn
        assert respawn is not None, "_replace starts a replacement only when lost workers are replaced"
        for attempt in range(_REPLACE_ATTEMPTS):
            name = f"{lost.name.split('@')[0]}.r{next(self._replacements)}@{respawn.job}"
            try:
                actor = EngineWorker.options(  # type: ignore[attr-defined]  # an ActorClass (see _start_workers)
                    name=name, namespace=NAMESPACE, num_cpus=respawn.cpus, num_gpus=respawn.gpus
                ).remote()
                answer = ray.get(
                    actor.load.remote(
                        respawn.specs[lost.model], respawn.cache_dir, respawn.device, respawn.engine_options
                    )
                )
            except Exception as exc:  # Ray's errors for a worker that could not start or died loading
                log.warning(
                    "replacement %s of Ray worker %s did not start (%s); attempt %d of %d",
                    name,
                    lost.name,
                    _one_line(exc),
                    attempt + 1,
                    _REPLACE_ATTEMPTS,
                )
                time.sleep(min(30.0, 2.0**attempt))
                continue
            if "error" in answer:
                log.error("replacement %s of Ray worker %s cannot load its model: %s", name, lost.name, answer["error"])
                return
            with self._lock:
                if self._closing:
                    ray.kill(actor)
                    return
                self._workers = {**self._workers, name: _Worker(name, lost.model, actor)}
                self._placement.add(name, lost.model)
            log.info("Ray worker %s replaces %s (pid %s)", name, lost.name, answer["pid"])
            return
        log.error("Ray worker %s was not replaced after %d attempts", lost.name, _REPLACE_ATTEMPTS)

    def _lost(self, worker: _Worker, why: str) -> WorkerLost:
        return WorkerLost(
            worker.name,
            self._placement.runs_on(worker.name),
            f"Ray worker {worker.name} of {worker.model} is gone ({why}); this job was lost with it. "
            f"Its runs come back on a live worker of the model from their last checkpoint.",
        )

    def _of_model(self, model: str) -> list[str]:
        return [name for name, w in self._workers.items() if w.model == model]

    # ------------------------------------------- tokenizer, LoRA and checkpoint work: on a worker
    def _light(self, model: str | None, method: str, *args):
        """`method` of a live worker's backend (of `model`, or any), beside its model work."""
        import ray

        for name in self._placement.live(model):
            try:
                answer = ray.get(self._workers[name].actor.call.remote(method, *args))
            except ray.exceptions.RayActorError:
                self._placement.lose(name)  # its lane finds out at its next command
                self._replace(self._workers[name])
                continue
            if answer[0] == "invalid":
                raise InvalidInput(answer[1], answer[2])
            return answer[1]
        raise RuntimeError(f"no live Ray worker holds {'a base model' if model is None else repr(model)}")

    def encode_prompt(self, model: str, prompt: Prompt) -> list[int]:
        return self._light(model, "encode_prompt", model, prompt)

    def encode_text(self, model: str, text: str) -> list[int]:
        return self._light(model, "encode_text", model, text)

    def decode(self, model: str, tokens: list[int]) -> str:
        return self._light(model, "decode", model, tokens)

    def token_bytes(self, model: str, tokens: list[int]) -> list[bytes]:
        return self._light(model, "token_bytes", model, tokens)

    def tokenizer_files(self, model: str) -> dict[str, str]:
        files = self._tokenizer_files.get(model)
        if files is None:  # a model's tokenizer never changes: fetched once
            files = self._tokenizer_files[model] = self._light(model, "tokenizer_files", model)
        return dict(files)

    def check_lora(self, model: str, lora: LoraConfig) -> None:
        self._light(model, "check_lora", model, lora)

    def read_checkpoint(self, directory: Path) -> CheckpointState:
        return self._light(None, "read_checkpoint", directory)

    def remove_partial_writes(self, root: Path) -> list[Path]:
        return self._light(None, "remove_partial_writes", root)

    def close(self) -> None:
        import ray

        with self._lock:
            self._closing = True  # no replacement joins from now on
        for worker in self._workers.values():
            try:
                ray.kill(worker.actor)
            except Exception:  # already gone
                pass
        if self._owns_ray:
            ray.shutdown()


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail at once for a 'HOST:PORT' (or 'ray://HOST:PORT') nobody answers at: `ray.init` would
    retry for minutes, logging as it goes."""
    if address is None or address == "auto":
        return  # no address: Ray starts one here; 'auto': Ray fails fast itself when none runs
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayStartError(f"--ray-address {address!r} is not 'auto', 'HOST:PORT' or 'ray://HOST:PORT'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayStartError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _death(exc: BaseException) -> str:
    """Why Ray says an actor died, in a few words (its message runs to several lines of ids)."""
    text = str(exc)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("The actor is dead because"):
            return line.removeprefix("The actor is dead because").strip().rstrip(".")
    return _one_line(exc)[:200]
