"""The service: validation, ownership, idempotency and job submission, shared by every protocol.

Routers (rest.py, and one module per further protocol) parse their wire format, call this, and
map its errors to their own shapes. Model work goes to the runner as commands; everything the
service needs to know of a model (vocabulary, tokenizer, LoRA rules, checkpoint format) it asks
the backend, so nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..backend import Backend, InvalidInput, ModelInfo, Progress
from ..backend.commands import CreateRun, DeleteRun, ForwardBackward, Load, OptimStep, Sample, Save, Score, ScorePrompts
from ..backend.results import RunCreated
from ..types import (
    LOSS_FNS,
    CreateRunRequest,
    ForwardBackwardRequest,
    HealthInfo,
    JobInfo,
    JobRef,
    JobStatus,
    LoadRequest,
    LoraConfig,
    MetricPoint,
    OptimStepRequest,
    Prompt,
    RunInfo,
    RunMetrics,
    SampleRequest,
    SaveRequest,
    ScoreRequest,
    WorkerStatus,
    parse_checkpoint_ref,
)
from . import checkpoints as names
from .checkpoints import MAX_TTL_SECONDS, CheckpointKind, UrlSigner, link_copy
from .datadir import DataDirLock
from .runner import Job, JobRunner, stored_path
from .settings import ServerSettings
from .store import INTERRUPTED, CheckpointLifecycle, JobRecord, Store, new_id

log = logging.getLogger(__name__)

# Seeds are stored as SQLite INTEGERs and fed to torch.manual_seed; either raises OverflowError above this,
# and the schema has no upper bound, so checking it up front answers 422 rather than 500.
MAX_SEED = 2**63 - 1
# Ids scored (target_prompt_logprobs) or drawn (prompt_alt_tokens_k) per prompt token, on average: as wide as a top-k.
MAX_PROMPT_CELLS_PER_TOKEN = 64


class ServiceError(Exception):
    """A request the service refuses: an HTTP-like status, a message, and (for 422) the offending
    field's location within the request body. Each router maps it to its protocol's shape."""

    def __init__(self, status: int, message: str, loc: tuple | None = None):
        super().__init__(message)
        self.status, self.message, self.loc = status, message, loc


class LimitExceeded(ServiceError):
    """A per-user limit refused the request (429). `clears`: whether waiting for the user's work
    in flight can make room; if not, retrying is pointless (the user must delete something or ask
    for less), and each protocol says so in its own way."""

    def __init__(self, limit: str, message: str, *, clears: bool):
        super().__init__(429, message)
        self.limit, self.clears = limit, clears


def not_found(what: str) -> ServiceError:
    return ServiceError(404, f"{what} not found")


def invalid(loc: tuple, message: str) -> ServiceError:
    return ServiceError(422, message, loc)


class Service:
    def __init__(self, settings: ServerSettings, backend: Backend, lock: DataDirLock):
        """`lock`: the data directory's, taken before the models load (so a second server on it
        fails at once); the service holds it until `close()`."""
        self.settings = settings
        self.lock = lock
        self.backend = backend
        self.models: dict[str, ModelInfo] = {m.name: m for m in backend.models()}
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
        self.runner.metrics.watch(self.runner.unfinished, lambda: [row["base_model"] for row in self.store.live_runs()])
        self.signer = UrlSigner(self.data_dir / "signing.key")
        self._restore()
        self.runner.start()
        self._sweeping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_periodically, name="checkpoint-sweep", daemon=True)
        self._sweeper.start()

    # --------------------------------------------------------------------------- life cycle
    def _restore(self) -> None:
        """After a restart: drop half-written checkpoints, fail interrupted jobs, rebuild every run
        on its own base model from its last saved or loaded checkpoint."""
        for leftover in self.backend.remove_partial_writes(self.checkpoint_root):
            log.warning("cleaned up an interrupted checkpoint write: %s", leftover)
        self._reconcile_checkpoints()
        # A run whose create_run job did not finish never reached its client (the request got no
        # answer); restoring it would bring back a live run nobody knows of, so it is dropped.
        for run_id in self.store.unfinished_creates():
            log.warning("run %s: its creation was interrupted; it is dropped", run_id)
            self.store.mark_run_deleted(run_id)
        failed = self.store.fail_unfinished_jobs()
        if failed:
            log.warning("%d job(s) were interrupted by the last shutdown and are marked failed", failed)
        self.sweep_checkpoints()
        self._remove_stale_snapshots()
        for row in self.store.live_runs():
            self._restore_run(row)

    def _restore_lost_run(self, run_id: str) -> None:
        """A run whose worker was lost comes back as after a restart, unless deleted meanwhile or
        still being created (its create job fails with the loss, and it never comes to be)."""
        row = self.store.run_row(run_id)
        if row is not None and run_id not in self.store.unfinished_creates():
            self._restore_run(row)

    def _restore_run(self, row: sqlite3.Row) -> None:
        run_id, model = row["id"], row["base_model"]
        if model not in self.models:
            log.error(
                "run %s is on base model %s, which this server does not hold (it holds %s); it stays "
                "listed and comes back when a server with that model starts",
                run_id,
                model,
                self._held(),
            )
            return
        lora = LoraConfig.model_validate_json(row["lora"])
        ref, directory = row["resume_from"], None
        if ref is None and row["step"]:
            log.warning("run %s was never saved; its adapter restarts from step 0", run_id)
        if row["resume_path"] is not None:  # its snapshot of what it loaded, not the source
            directory = str(self.data_dir / row["resume_path"])
        elif ref is not None:
            try:
                source_run, name = parse_checkpoint_ref(ref, default_run=run_id)
                checkpoint = self.store.checkpoint(source_run, name)
                if checkpoint is None:
                    raise ValueError(f"checkpoint {ref} is not recorded")
                directory = str(self.data_dir / checkpoint.path)
            except ValueError as exc:
                log.error("run %s: could not restore %s (%s); it restarts from step 0", run_id, ref, exc)
                ref = None
        with_optimizer = True
        if directory is not None:  # what a run loaded may be weights only: then Adam's moments start afresh
            try:
                with_optimizer = self.backend.read_checkpoint(Path(directory)).has_optimizer
            except InvalidInput:
                pass  # the create below fails on it and says why
        create = CreateRun(
            model=model,
            run_id=run_id,
            lora=lora,
            seed=row["seed"],
            from_checkpoint=directory,
            with_optimizer=with_optimizer,
        )
        [outcome] = self.backend.execute([create])
        if outcome.error is not None and directory is not None:
            # A corrupted adapter or truncated optimizer state must not stop the server starting.
            log.error("run %s: could not restore %s (%s); it restarts from step 0", run_id, ref, outcome.error)
            ref = None
            [outcome] = self.backend.execute([create.model_copy(update={"from_checkpoint": None})])
        if outcome.error is not None:
            log.error("run %s could not be rebuilt: %s", run_id, outcome.error)
            return
        self.store.record_restore(run_id, outcome.result(RunCreated).step, restored_from=ref)

    def _remove_stale_snapshots(self) -> None:
        """Snapshots no live run restores from: of deleted runs, superseded by a later save or
        load, or written by a load the crash interrupted before it was recorded."""
        keep = {row["resume_path"] for row in self.store.live_runs() if row["resume_path"]}
        root = self.snapshot_root
        for path in root.glob("*/*") if root.is_dir() else ():
            if stored_path(path, self.data_dir) not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _reconcile_checkpoints(self) -> None:
        """A save killed after its directory was renamed into place but before the database
        recorded it leaves a checkpoint directory that no listing shows, while its job reports
        failed ("its effect was not applied"). Such directories of known runs are removed; an
        overwrite killed at that moment is kept (it is complete) and its listed step corrected."""
        if not self.checkpoint_root.is_dir():
            return
        for run_dir in self.checkpoint_root.iterdir():
            if not run_dir.is_dir() or run_dir.is_symlink() or self.store.run_owner(run_dir.name) is None:
                continue  # not a run this database knows: leave it alone
            recorded = {c.name: c.step for c in self.store.checkpoints(run_dir.name)}
            for directory in run_dir.iterdir():
                if directory.name in recorded and not directory.is_symlink():
                    try:
                        step = self.backend.read_checkpoint(directory).step
                    except InvalidInput:
                        continue  # unreadable: a load of it fails with a clear error
                    if step != recorded[directory.name]:
                        log.warning(
                            "checkpoint %s was overwritten by an interrupted save; it holds step %d", directory, step
                        )
                        self.store.set_checkpoint_step(run_dir.name, directory.name, step)
                if directory.is_dir() and not directory.is_symlink() and directory.name not in recorded:
                    log.warning("removed checkpoint %s: its save was interrupted before it was recorded", directory)
                    shutil.rmtree(directory, ignore_errors=True)

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

    def model(self, name: str | None, field: tuple = ("base_model",)) -> str:
        """The base model a request names (the default when it names none); 422 listing the
        held ones when this server does not hold it."""
        if name is None:
            return self.default_model
        if name not in self.models:
            raise invalid(field, f"this server does not hold base model {name!r}; it holds {self._held()}")
        return name

    def _held(self) -> str:
        return ", ".join(repr(m) for m in self.models)

    def tokenizer_files(self, model: str | None) -> dict:
        name = self.model(model, ("query", "model"))
        return {"model": name, "files": self.backend.tokenizer_files(name)}

    # --------------------------------------------------------------------------------- runs
    def owned_run(self, user: str, run_id: str) -> sqlite3.Row:
        row = self.store.run_row(run_id)
        if row is None or row["owner"] != user:  # another user's run is as good as absent
            raise not_found(f"run {run_id}")
        return row

    def _usable_run(self, user: str, run_id: str) -> tuple[sqlite3.Row, str]:
        """The run and its base model, which this server must hold to work on it."""
        row = self.owned_run(user, run_id)
        if row["base_model"] not in self.models:
            raise ServiceError(
                409,
                f"run {run_id} is on base model {row['base_model']!r}, which this server "
                f"does not hold (it holds {self._held()}); start it with --model {row['base_model']}",
            )
        return row, row["base_model"]

    def get_run(self, user: str, run_id: str) -> RunInfo:
        return self._run_infos(user, [self.owned_run(user, run_id)])[0]

    def list_runs(self, user: str) -> list[RunInfo]:
        return self._run_infos(user, self.store.live_runs(user))

    def _run_infos(self, user: str, rows: list[sqlite3.Row]) -> list[RunInfo]:
        """The runs with their status, last loss and last activity (three queries for all of the
        user's runs; for one run, for that run's rows alone)."""
        run_id = rows[0]["id"] if len(rows) == 1 else None
        losses, activity = self.store.last_losses(user, run_id), self.store.last_activity(user, run_id)
        busy: dict[str, set[str]] = {}
        for job in self.store.unfinished_jobs(user, run_id):
            busy.setdefault(job["run_id"], set()).add(job["kind"])
        infos = []
        for row in rows:
            kinds = busy.get(row["id"], set())
            status = (
                "unavailable"
                if row["base_model"] not in self.models
                else "creating"
                if "create_run" in kinds
                else "working"
                if kinds
                else "idle"
            )
            _, loss, tokens = losses.get(row["id"], (None, None, None))
            updated = activity.get(row["id"])
            infos.append(
                self.store.run_info(
                    row,
                    status=status,
                    last_loss=loss / tokens if loss is not None and tokens else None,
                    updated_at=None if updated is None else datetime.fromtimestamp(updated, tz=timezone.utc),
                )
            )
        return infos

    def run_metrics(self, user: str, run_id: str) -> RunMetrics:
        """The run's curve: one point per optimizer step, from the training log."""
        self.owned_run(user, run_id)
        points: dict[int, dict[str, Any]] = {}
        for row in self.store.training_log(run_id):
            point = points.setdefault(row["step"], {"step": row["step"]})
            point["recorded_at"] = row["recorded_at"]
            if row["kind"] == "optim_step":
                point.update(grad_norm=row["grad_norm"], learning_rate=row["learning_rate"])
            elif row["loss"] is not None:
                point["loss"] = point.get("loss", 0.0) + row["loss"]
                point["num_tokens"] = point.get("num_tokens", 0) + row["num_tokens"]
                # cross_entropy: divided by its weights' sum (a mean NLL per token whatever the
                # weights' scale); the RL losses and rows logged before weight sums: by the tokens.
                weight = row["weight_sum"] if row["weight_sum"] is not None else row["num_tokens"]
                point["weight_sum"] = point.get("weight_sum", 0.0) + weight
        for point in points.values():
            if point.get("weight_sum"):
                point["loss_per_token"] = point["loss"] / point["weight_sum"]
            point["recorded_at"] = datetime.fromtimestamp(point["recorded_at"], tz=timezone.utc)
        return RunMetrics(run_id=run_id, points=[MetricPoint(**points[step]) for step in sorted(points)])

    def run_jobs(self, user: str, run_id: str, limit: int) -> list[JobInfo]:
        """The run's newest jobs, queued and running ones first (their results left out)."""
        self.owned_run(user, run_id)
        unfinished = self.store.unfinished_jobs(user, run_id)
        seen = {row["id"] for row in unfinished}
        recent = [row for row in self.store.recent_jobs(user, run_id, limit) if row["id"] not in seen]
        rows = [*reversed(unfinished), *recent][: max(limit, len(unfinished))]
        return [self.store.job_record(row).info(with_result=False) for row in rows]

    async def create_run(self, user: str, request: CreateRunRequest, key: str | None = None) -> RunInfo:
        """Create a run and wait until it exists (the REST API answers with the run itself)."""
        ref = self.submit_create_run(user, request, key)
        job = await self._wait_finished(user, ref.job_id)
        if job.status is JobStatus.failed:
            field = ("from_checkpoint",) if request.from_checkpoint is not None else ("lora",)
            raise invalid(field, job.error or "could not create the run")
        assert job.run_id is not None, "a create_run job names its run"
        return self.get_run(user, job.run_id)

    def submit_create_run(
        self,
        user: str,
        request: CreateRunRequest,
        key: str | None = None,
        *,
        run_id: str | None = None,
        metadata: dict | None = None,
        with_optimizer: bool = True,
    ) -> JobRef:
        """Validate, record the run and queue its creation; the job's run_id names it. `run_id`:
        the protocol's own id for it (Tinker's '<session>:train:<n>'), else a fresh one."""
        if request.seed > MAX_SEED:
            raise invalid(("seed",), f"seed {request.seed} is above the largest allowed, {MAX_SEED}")
        lora, source, ref = request.lora, None, None
        requested_model = request.base_model
        if request.from_checkpoint is not None:
            source, ref = self._checkpoint(
                user, request.from_checkpoint, default_run=None, field="from_checkpoint", published=True
            )
            try:
                state = self.backend.read_checkpoint(source)
            except InvalidInput as exc:
                raise invalid(("from_checkpoint",), exc.message) from None
            lora = state.lora
            if requested_model is None:
                requested_model = state.base_model  # a checkpoint continues on its own model
            elif state.base_model is not None and state.base_model != requested_model:
                raise invalid(
                    ("from_checkpoint",),
                    f"checkpoint {ref} was trained on {state.base_model!r}, not {requested_model!r}",
                )
        model = self.model(
            requested_model, ("from_checkpoint",) if request.base_model is None and source else ("base_model",)
        )
        try:
            self.backend.check_lora(model, lora)
        except InvalidInput as exc:
            raise invalid(
                ("lora", *exc.loc) if source is None else ("from_checkpoint", *exc.loc[1:]), exc.message
            ) from None
        digest = _request_hash("create_run", run_id, request) if key else None
        if key and (existing := self.store.job_by_key(user, key)) is not None:
            if existing["status"] == JobStatus.failed.value and existing["error"] == INTERRUPTED:
                # A create retried across a server restart (the SDK reuses its key) must not replay the
                # interrupted attempt's failure: that attempt has no effect, so create afresh.
                self.store.release_idempotency_key(existing["id"])
            else:
                return self._replay(existing, digest, key)
        if run_id is not None and (row := self.store.run_row_any(run_id)) is not None:
            if row["owner"] != user or row["deleted_at"] is not None:
                raise ServiceError(409, f"run id {run_id} is taken")
            return self._replay_create(user, run_id)
        run_id = run_id or new_id("run")
        if self.limits.runs is not None and len(self.store.live_runs(user)) >= self.limits.runs:
            raise LimitExceeded(
                "max_runs_per_user",
                f"you have {self.limits.runs} live runs; the limit is "
                f"max_runs_per_user ({self.limits.runs}): delete one first (DELETE /v1/runs/<id>; a "
                "Tinker model's id is its run id)",
                clears=False,
            )
        self.store.add_run(run_id, user, model, lora, request.seed, metadata)
        command = CreateRun(
            model=model,
            run_id=run_id,
            lora=lora,
            seed=request.seed,
            from_checkpoint=None if source is None else str(source),
            with_optimizer=with_optimizer,
        )
        job = Job(new_id("job"), command, checkpoint=ref)
        try:
            answer = self.submit(user, job, request, key, digest=digest)
        except ServiceError:  # refused (a limit): the run never came to be
            self.store.mark_run_deleted(run_id)
            raise
        if answer.job_id != job.id:  # a concurrent retry with the same key won: this attempt is void
            self.store.mark_run_deleted(run_id)
        return answer

    def _replay_create(self, user: str, run_id: str) -> JobRef:
        """The create job of an existing run (a protocol that names its runs asked again)."""
        row = self.store.create_job_of(run_id, user)
        if row is not None:
            return JobRef(job_id=row["id"], status=JobStatus(row["status"]))
        job_id = new_id("job")  # its create job has expired: a completed stand-in
        self.store.add_job(job_id, user, run_id, "create_run")
        self.store.mark_finished(job_id, result=json.dumps({"run_id": run_id, "step": 0}))
        return JobRef(job_id=job_id, status=JobStatus.completed)

    def failed_job(self, user: str, kind: str, run_id: str | None, message: str, category: str = "user") -> JobRef:
        """A job that failed before it ran: protocols whose errors travel in futures (Tinker) answer
        a request they refuse with one."""
        job_id = new_id("job")
        self.store.add_job(job_id, user, run_id, kind)
        self.store.mark_finished(job_id, error=message, error_category=category)
        return JobRef(job_id=job_id, status=JobStatus.failed)

    async def delete_run(self, user: str, run_id: str) -> None:
        row = self.owned_run(user, run_id)
        self.store.mark_run_deleted(run_id)  # new requests for it get 404 from now on
        if row["base_model"] in self.models:  # else it was never rebuilt in this server
            # Queued behind the run's pending jobs, so they finish first.
            await self._submit_and_wait(user, Job(new_id("job"), DeleteRun(model=row["base_model"], run_id=run_id)))
        # Its checkpoints go with it (runs that loaded one restore from their own snapshot of it); a
        # crash before this is made good by the sweep at the next start. Off the event loop: a
        # run's folders can be many.
        await asyncio.to_thread(self._remove_checkpoints_of, run_id)

    def _remove_checkpoints_of(self, run_id: str) -> None:
        for checkpoint in self.store.checkpoints(run_id):
            self._remove_checkpoint(checkpoint.run_id, checkpoint.name)
        _remove_empty(self.checkpoint_root / run_id)

    # --------------------------------------------------------------------------------- jobs
    def submit_forward_backward(
        self,
        user: str,
        run_id: str,
        request: ForwardBackwardRequest,
        key: str | None,
        *,
        forward_only: bool = False,
        all_logprobs: bool = False,
    ) -> JobRef:
        _, model = self._usable_run(user, run_id)
        limits = self.settings
        if len(request.data) > limits.max_batch_examples:
            raise invalid(
                ("data",),
                f"{len(request.data)} examples; the limit is max_batch_examples ({limits.max_batch_examples})",
            )
        self._check_total_tokens(
            ("data",), sum(len(d.model_input.tokens) for d in request.data), f"{len(request.data)} examples"
        )
        for i, datum in enumerate(request.data):
            self.check_tokens(model, datum.model_input.tokens, ("data", i, "model_input", "tokens"))
            self.check_tokens(
                model, datum.loss_fn_inputs.flat_target_tokens(), ("data", i, "loss_fn_inputs", "target_tokens")
            )
        # Already validated: constructed without a second pass over every datum.
        command = ForwardBackward.model_construct(
            model=model,
            run_id=run_id,
            data=request.data,
            loss_fn=request.loss_fn,
            loss_fn_config=request.loss_fn_config or {},
            forward_only=forward_only,
            all_logprobs=all_logprobs,
        )
        kind_request = (request, forward_only)  # a forward and a forward_backward of one datum differ
        return self.submit(user, Job(new_id("job"), command), kind_request, key)

    def submit_optim_step(self, user: str, run_id: str, request: OptimStepRequest, key: str | None) -> JobRef:
        _, model = self._usable_run(user, run_id)
        command = OptimStep(model=model, run_id=run_id, adam_params=request.adam_params)
        return self.submit(user, Job(new_id("job"), command), request, key)

    def submit_sample(self, user: str, run_id: str | None, request: SampleRequest, key: str | None) -> JobRef:
        model = self._sampling_model(user, run_id, request.base_model)
        _check_unicode(request)
        prompts = [self.encode_prompt(model, p, ("prompts", i)) for i, p in enumerate(request.prompts)]
        return self.submit_sample_tokens(
            user, model, run_id, prompts, request.num_samples, request.sampling_params, request, key
        )

    def submit_sample_tokens(
        self,
        user: str,
        model: str,
        run_id: str | None,
        prompts: list[list[int]],
        num_samples: int,
        params,
        request: Any,
        key: str | None,
        *,
        snapshot: Path | None = None,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_logprobs: int = 0,
        prompt_logprobs_last_n: int | None = None,
        prompt_targets: list | None = None,
        prompt_alt_tokens_k: int = 0,
        progress: Progress | None = None,
        consumers_gone: Callable[[], bool] | None = None,
    ) -> JobRef:
        """Sample token prompts on `model`: from run `run_id`'s live adapter, a saved `snapshot`
        (a checkpoint directory), or the bare model when both are None. `progress` receives the
        tokens as they are decoded (from the worker thread); `consumers_gone`, asked after every
        decode step, stops the sample once it answers True."""
        if params.seed is not None and params.seed > MAX_SEED:
            raise invalid(("sampling_params", "seed"), f"seed {params.seed} is above the largest allowed, {MAX_SEED}")
        if params.max_tokens > self.settings.max_new_tokens:
            raise invalid(
                ("sampling_params", "max_tokens"),
                f"max_tokens {params.max_tokens} is above the limit {self.settings.max_new_tokens}",
            )
        total = len(prompts) * num_samples
        if total > self.settings.max_samples_per_request:
            raise invalid(
                ("num_samples",),
                f"{len(prompts)} prompts x {num_samples} samples = {total} candidates; "
                f"the limit is {self.settings.max_samples_per_request}",
            )
        # Every candidate holds a KV cache as wide as its prompt plus max_tokens.
        self._check_total_tokens(
            ("num_samples",),
            sum(len(p) + params.max_tokens for p in prompts) * num_samples,
            f"{len(prompts)} prompts x {num_samples} samples x (prompt + {params.max_tokens} max_tokens)",
        )
        self.check_tokens(model, params.stop_token_ids, ("sampling_params", "stop_token_ids"))
        for i, tokens in enumerate(prompts):
            self.check_tokens(model, tokens, ("prompts", i, "tokens"))
        self._check_prompt_scoring(model, prompts, prompt_logprobs_last_n, prompt_targets, prompt_alt_tokens_k)
        command = Sample(
            model=model,
            run_id=run_id,
            prompts=prompts,
            num_samples=num_samples,
            sampling_params=params,
            snapshot=None if snapshot is None else str(snapshot),
            prompt_logprobs=prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            topk_logprobs=topk_logprobs,
            prompt_logprobs_last_n=prompt_logprobs_last_n,
            prompt_targets=prompt_targets,
            prompt_alt_tokens_k=prompt_alt_tokens_k,
        )
        return self.submit(
            user, Job(new_id("job"), command, progress=progress, consumers_gone=consumers_gone), request, key
        )

    def _check_prompt_scoring(
        self, model: str, prompts: list[list[int]], last_n: int | None, targets: list | None, alt_k: int
    ) -> None:
        """What a sample asks at its prompts' positions fits each prompt: `last_n` at most len - 1,
        `targets` one row per position 1 .. len - 1 of ids in the vocabulary, at most MAX_PROMPT_CELLS_PER_TOKEN
        ids (and draws) per prompt token on average (they cost a vocabulary row each, like a top-k)."""
        vocab = self.models[model].vocab_size
        for i, prompt in enumerate(prompts):
            if last_n is not None and not 1 <= last_n <= len(prompt) - 1:
                raise invalid(
                    ("prompt_logprobs_last_n",),
                    f"prompt_logprobs_last_n is {last_n}; it must be between 1 and len(prompt) - 1 = {len(prompt) - 1}",
                )
            cells_limit = MAX_PROMPT_CELLS_PER_TOKEN * len(prompt)
            if alt_k * (len(prompt) - 1) > cells_limit:
                raise invalid(
                    ("prompt_alt_tokens_k",),
                    f"prompt_alt_tokens_k {alt_k} x {len(prompt) - 1} positions "
                    f"is above the limit of {cells_limit} ({MAX_PROMPT_CELLS_PER_TOKEN} per prompt token)",
                )
            if targets is None:
                continue
            rows = targets[i]
            if len(rows) != len(prompt) - 1:
                raise invalid(
                    ("target_prompt_logprobs",),
                    f"target_prompt_logprobs has {len(rows)} rows; the prompt "
                    f"has {len(prompt)} tokens, so it needs len(prompt) - 1 = {len(prompt) - 1}",
                )
            cells = sum(len(row) for row in rows)
            if cells == 0:
                raise invalid(
                    ("target_prompt_logprobs",), "target_prompt_logprobs names no token id (every cell is -1)"
                )
            if cells > cells_limit:
                raise invalid(
                    ("target_prompt_logprobs",),
                    f"target_prompt_logprobs names {cells} ids; the limit is "
                    f"{cells_limit} ({MAX_PROMPT_CELLS_PER_TOKEN} per prompt token)",
                )
            for r, row in enumerate(rows):
                for token in row:
                    if not 0 <= token < vocab:
                        raise invalid(
                            ("target_prompt_logprobs", r), f"token id {token} is outside the vocabulary [0, {vocab})"
                        )

    def submit_score_prompts(
        self,
        user: str,
        model: str,
        run_id: str | None,
        prompts: list[list[int]],
        topk: int,
        request: Any,
        *,
        snapshot: Path | None = None,
    ) -> JobRef:
        """Score token prompts on `model` (a run's live adapter, a saved `snapshot`, or the bare
        model): every token's logprob given those before it, one forward pass, no sampling."""
        if len(prompts) > self.settings.max_batch_examples:
            raise invalid(
                ("prompts",),
                f"{len(prompts)} prompts; the limit is max_batch_examples ({self.settings.max_batch_examples})",
            )
        self._check_total_tokens(("prompts",), sum(len(p) for p in prompts), f"{len(prompts)} prompts")
        for i, tokens in enumerate(prompts):
            self.check_tokens(model, tokens, ("prompts", i, "tokens"))
        command = ScorePrompts(
            model=model, run_id=run_id, prompts=prompts, topk=topk, snapshot=None if snapshot is None else str(snapshot)
        )
        return self.submit(user, Job(new_id("job"), command), request, None)

    def submit_score(self, user: str, run_id: str, request: ScoreRequest, key: str | None) -> JobRef:
        _, model = self._usable_run(user, run_id)
        _check_unicode(request)
        limit = self.settings.max_batch_examples
        if len(request.responses) > limit:
            raise invalid(
                ("responses",), f"{len(request.responses)} responses; the limit is max_batch_examples ({limit})"
            )
        prompt = self.encode_prompt(model, request.prompt, ("prompt",))
        responses = [self.backend.encode_text(model, r) for r in request.responses]
        self._check_total_tokens(
            ("responses",), sum(len(prompt) + len(r) for r in responses), f"{len(responses)} x (prompt + response)"
        )
        for i, tokens in enumerate(responses):
            if len(prompt) + len(tokens) > self.settings.max_prompt_tokens:
                raise invalid(("responses", i), f"prompt + response exceed {self.settings.max_prompt_tokens} tokens")
        command = Score(model=model, run_id=run_id, prompt=prompt, responses=responses)
        return self.submit(user, Job(new_id("job"), command), request, key)

    def submit_save(
        self,
        user: str,
        run_id: str,
        request: SaveRequest,
        key: str | None,
        *,
        kind: CheckpointKind = CheckpointKind.training,
        ttl_seconds: float | None = None,
        overwrite: bool = True,
        meta: dict | None = None,
        field: str = "name",
    ) -> JobRef:
        """Save the run's state as checkpoint `request.name` of `kind` (its namespace: see
        checkpoints.py); training checkpoints hold the optimizer state, the others weights only.
        `ttl_seconds`: the server deletes it that long after the save."""
        try:
            name = names.stored_name(kind, request.name)
        except ValueError as exc:
            raise invalid((field,), str(exc)) from None
        self._usable_run(user, run_id)
        _check_ttl(ttl_seconds)
        if not overwrite and self.store.checkpoint(run_id, name) is not None:
            raise invalid((field,), f"checkpoint {request.name!r} of run {run_id} exists; overwrite it explicitly")
        lifecycle = CheckpointLifecycle(
            with_optimizer=names.with_optimizer(kind), ttl_seconds=ttl_seconds, meta=meta or {}
        )
        return self._submit_save(user, run_id, name, lifecycle, (request, kind, ttl_seconds, meta), key)

    def submit_sampler_snapshot(
        self, user: str, run_id: str, sampler_id: str, key: str | None, *, ttl_seconds: float | None = None
    ) -> tuple[JobRef, str]:
        """Save the run's weights for sampling session `sampler_id` (Tinker's unnamed
        save_weights_for_sampler); returns the job and the checkpoint's reference. The run keeps
        only its newest `sampler_snapshots_kept` such snapshots: older ones are pruned here, at
        submission, whether or not anyone retrieves the futures. Named checkpoints are never pruned."""
        self._usable_run(user, run_id)
        _check_ttl(ttl_seconds)
        name = names.auto_snapshot_name(sampler_id)
        self._prune_snapshots(run_id, self.settings.sampler_snapshots_kept - 1, but=name)
        lifecycle = CheckpointLifecycle(with_optimizer=False, auto=True, ttl_seconds=ttl_seconds)
        ref = self._submit_save(user, run_id, name, lifecycle, ("snapshot", sampler_id, ttl_seconds), key)
        return ref, f"{run_id}/{name}"

    def _prune_snapshots(self, run_id: str, keep: int, but: str | None = None) -> None:
        """Delete the run's unnamed sampler snapshots but its newest `keep` (and `but`)."""
        snapshots = [c for c in self.store.auto_checkpoints(run_id) if c.name != but]
        for old in snapshots[: max(0, len(snapshots) - keep)]:
            self._remove_checkpoint(run_id, old.name)

    def _submit_save(
        self, user: str, run_id: str, name: str, lifecycle: CheckpointLifecycle, request: Any, key: str | None
    ) -> JobRef:
        _, model = self._usable_run(user, run_id)
        target = self.checkpoint_root / run_id / name
        # A run's checkpoint folder that is a symlink to elsewhere would be written through;
        # loads refuse such paths, so saves must too.
        if target.parent.exists() and not target.parent.resolve().is_relative_to(self.checkpoint_root):
            raise invalid(("name",), f"checkpoint {run_id}/{name} is not inside the data directory")
        if not lifecycle.auto and self.store.checkpoint(run_id, name) is None:  # an overwrite adds nothing
            self._check_checkpoint_limits(user)
        command = Save(model=model, run_id=run_id, directory=str(target), with_optimizer=lifecycle.with_optimizer)
        job = Job(new_id("job"), command, checkpoint=f"{run_id}/{name}", lifecycle=lifecycle)
        return self.submit(user, job, request, key)

    def submit_load(
        self, user: str, run_id: str, request: LoadRequest, key: str | None, *, with_optimizer: bool = True
    ) -> JobRef:
        _, model = self._usable_run(user, run_id)
        path, ref = self._checkpoint(user, request.checkpoint, default_run=run_id, field="checkpoint", published=True)
        command = Load(model=model, run_id=run_id, directory=str(path), with_optimizer=with_optimizer)
        return self.submit(user, Job(new_id("job"), command, checkpoint=ref), request, key)

    def _check_checkpoint_limits(self, user: str) -> None:
        limits = self.limits
        if limits.checkpoints is None and limits.checkpoint_bytes is None:
            return
        listed = self.store.checkpoints_of(user)
        if limits.checkpoints is not None:
            queued = sum(1 for job in self.store.unfinished_jobs(user) if job["kind"] == "save")
            if len(listed) + queued >= limits.checkpoints:
                raise LimitExceeded(
                    "max_checkpoints_per_user",
                    f"you have {len(listed)} checkpoints and {queued} "
                    f"saves queued; the limit is max_checkpoints_per_user ({limits.checkpoints}): "
                    "delete some first",
                    clears=False,
                )
        if limits.checkpoint_bytes is not None:
            held = sum(_bytes_in(self.data_dir / c.path) for c in listed)
            if held >= limits.checkpoint_bytes:
                raise LimitExceeded(
                    "max_checkpoint_bytes_per_user",
                    f"your checkpoints hold {held} bytes; the limit "
                    f"is max_checkpoint_bytes_per_user ({limits.checkpoint_bytes}): delete some first",
                    clears=False,
                )

    def _sampling_model(self, user: str, run_id: str | None, requested: str | None) -> str:
        if run_id is None:
            return self.model(requested)
        _, model = self._usable_run(user, run_id)
        if requested is not None and requested != model:
            raise invalid(("base_model",), f"run {run_id} is on {model!r}, not {requested!r}")
        return model

    def checkpoint_path(
        self, user: str, ref: str, field: str = "checkpoint", *, published: bool = False
    ) -> tuple[Path, str]:
        """The directory of checkpoint '<run_id>/<name>' the user owns (404 otherwise); with
        `published`, also another user's that its owner published (to load, sample or download)."""
        return self._checkpoint(user, ref, default_run=None, field=field, published=published)

    def delete_checkpoint(self, user: str, run_id: str, name: str) -> None:
        # One whose files are gone can still be unlisted.
        self._checkpoint(user, f"{run_id}/{name}", default_run=None, field="checkpoint", must_exist=False)
        self._remove_checkpoint(run_id, name)

    def set_checkpoint_ttl(self, user: str, run_id: str, name: str, ttl_seconds: float | None) -> None:
        """The checkpoint expires `ttl_seconds` from now (None: never)."""
        self._checkpoint(user, f"{run_id}/{name}", default_run=None, field="checkpoint")
        _check_ttl(ttl_seconds)
        self.store.set_checkpoint_expiry(run_id, name, None if ttl_seconds is None else time.time() + ttl_seconds)

    def publish_checkpoint(self, user: str, run_id: str, name: str, public: bool) -> None:
        """Published: every user of this server may load, sample and download it (not change it)."""
        self._checkpoint(user, f"{run_id}/{name}", default_run=None, field="checkpoint")
        self.store.set_checkpoint_public(run_id, name, public)

    def sweep_checkpoints(self) -> int:
        """Delete expired checkpoints and those of deleted runs (rows, then files), and prune the
        unnamed sampler snapshots that saves finishing after their successors' submission left
        beyond `sampler_snapshots_kept`; returns how many checkpoints expired or went with their run."""
        for run_id in self.store.runs_with_auto_checkpoints_over(self.settings.sampler_snapshots_kept):
            self._prune_snapshots(run_id, self.settings.sampler_snapshots_kept)
        doomed = self.store.checkpoints_to_remove(time.time())
        for checkpoint in doomed:
            log.info(
                "checkpoint %s/%s: %s, deleted",
                checkpoint.run_id,
                checkpoint.name,
                "expired" if self.store.run_row(checkpoint.run_id) else "its run was deleted",
            )
            self._remove_checkpoint(checkpoint.run_id, checkpoint.name)
        for run_id in {c.run_id for c in doomed}:
            if self.store.run_row(run_id) is None:
                _remove_empty(self.checkpoint_root / run_id)
        return len(doomed)

    def _sweep_periodically(self) -> None:
        while not self._sweeping.wait(self.settings.checkpoint_sweep_seconds):
            try:
                self.sweep_checkpoints()
            except Exception:  # a busy database, say: the next sweep tries again
                log.exception(
                    "the checkpoint sweep failed; it runs again in %.0f s", self.settings.checkpoint_sweep_seconds
                )

    def _remove_checkpoint(self, run_id: str, name: str) -> None:
        """Unlist a checkpoint and delete its files. A live run that a restart would rebuild from
        it gets its own hard-linked copy first (as after a load), so the restart still finds it."""
        checkpoint = self.store.checkpoint(run_id, name)
        if checkpoint is None:
            return
        path = (self.data_dir / checkpoint.path).resolve()
        for row in self.store.runs_resuming_from(f"{run_id}/{name}"):
            if path.is_dir():
                copy = self.snapshot_root / row["id"] / new_id("keep")
                link_copy(path, copy)
                self.store.set_resume_path(row["id"], stored_path(copy, self.data_dir))
        self.store.delete_checkpoint(run_id, name)  # unlisted first: a crash then leaves only a stray folder
        if path.is_relative_to(self.checkpoint_root):
            shutil.rmtree(path, ignore_errors=True)

    def _checkpoint(
        self, user: str, ref: str, default_run: str | None, field: str, must_exist: bool = True, published: bool = False
    ) -> tuple[Path, str]:
        try:
            source_run, name = parse_checkpoint_ref(ref, default_run=default_run or "")
        except ValueError as exc:
            raise invalid((field,), str(exc)) from None
        owner = self.store.run_owner(source_run)
        checkpoint = self.store.checkpoint(source_run, name) if owner is not None else None
        if checkpoint is not None and owner != user and not (published and checkpoint.public):
            checkpoint = None  # another user's, unpublished: as good as absent
        if (
            checkpoint is not None
            and checkpoint.expires_at is not None
            and checkpoint.expires_at.timestamp() <= time.time()
        ):
            checkpoint = None  # expired: never served, whether or not the sweep has deleted it yet
        if checkpoint is None:
            raise not_found(f"checkpoint {source_run}/{name}")
        path = (self.data_dir / checkpoint.path).resolve()
        if not path.is_relative_to(self.checkpoint_root):
            # A symlink or edited record pointing outside the data directory is refused.
            raise invalid((field,), f"checkpoint {source_run}/{name} is not inside the data directory")
        if must_exist and not path.is_dir():
            raise ServiceError(
                404,
                f"checkpoint {source_run}/{name} is listed but its files are gone "
                "(removed from the data directory outside the server?)",
            )
        return path, f"{source_run}/{name}"

    # ---------------------------------------------------------------------------- plumbing
    def encode_prompt(self, model: str, prompt: Prompt, loc: tuple) -> list[int]:
        try:
            tokens = self.backend.encode_prompt(model, prompt)
        except InvalidInput as exc:
            raise invalid((*loc, *exc.loc), exc.message) from None
        self.check_tokens(model, tokens, (*loc, "tokens"))
        return tokens

    def _check_total_tokens(self, loc: tuple, total: int, what: str) -> None:
        limit = self.settings.max_tokens_per_request
        if total > limit:
            raise invalid(loc, f"{what} = {total} tokens; the limit is max_tokens_per_request ({limit})")

    def check_tokens(self, model: str, tokens: list[int], loc: tuple) -> None:
        if len(tokens) > self.settings.max_prompt_tokens:
            raise invalid(loc, f"{len(tokens)} tokens; the limit is {self.settings.max_prompt_tokens}")
        vocab = self.models[model].vocab_size
        for position, token in enumerate(tokens):
            if not 0 <= token < vocab:
                raise invalid((*loc, position), f"token id {token} is outside the vocabulary [0, {vocab})")

    def submit(self, user: str, job: Job, request: Any, key: str | None, *, digest: str | None = None) -> JobRef:
        """Record `job` as pending and queue it; a replayed idempotency key returns the original."""
        key = key or None  # an empty Idempotency-Key header is no key (it must not be stored as one)
        command = job.command
        if key and digest is None:
            digest = _request_hash(command.kind, command.run_id, request)
        if key:
            existing = self.store.job_by_key(user, key)
            if existing is not None:
                return self._replay(existing, digest, key)
        job.owner = user
        refusal = self.runner.admit(job, self.limits)
        if refusal is not None:
            raise LimitExceeded(refusal.limit, refusal.message, clears=refusal.clears)
        try:
            self.store.add_job(job.id, user, command.run_id, command.kind, key, digest)
        except sqlite3.IntegrityError:  # the same key raced in from a concurrent retry
            self.runner.withdraw(job.id)
            existing = self.store.job_by_key(user, key) if key else None
            if existing is None or key is None:  # not a key's race: a genuine integrity failure
                raise
            return self._replay(existing, digest, key)
        except BaseException:
            self.runner.withdraw(job.id)
            raise
        self.runner.submit(job)
        return JobRef(job_id=job.id, status=JobStatus.pending)

    @staticmethod
    def _replay(existing: sqlite3.Row, digest: str | None, key: str) -> JobRef:
        if existing["request_hash"] != digest:
            raise ServiceError(409, f"Idempotency-Key {key!r} was already used for a different request")
        return JobRef(job_id=existing["id"], status=JobStatus(existing["status"]))

    async def _submit_and_wait(self, user: str, job: Job) -> JobRecord:
        job.owner = user  # not admitted: a deletion frees what the limits count, it is never refused
        self.store.add_job(job.id, user, job.command.run_id, job.command.kind)
        self.runner.submit(job)
        return await self._wait_finished(user, job.id)

    async def _wait_finished(self, user: str, job_id: str) -> JobRecord:
        while not (record := self.job(user, job_id)).finished:
            await self.wait_job(user, job_id, 60)
        return record

    def job(self, user: str, job_id: str) -> JobRecord:
        row = self.store.job_row(job_id)
        if row is None or row["owner"] != user:
            raise not_found(f"job {job_id}")
        return self.store.job_record(row)

    async def wait_job(self, user: str, job_id: str, wait: float) -> JobRecord:
        """The job, once finished and its recording complete or `wait` seconds passed. A save's
        job is finished from the store's commit, which makes the save the run's restore point, and
        only then are the run's load snapshots dropped: a waiting client is answered after that."""

        def settled(record: JobRecord) -> bool:
            return record.finished and self.runner.settled(job_id)

        record = self.job(user, job_id)
        if not settled(record) and wait > 0:
            await self.runner.wait(job_id, wait, lambda: settled(self.job(user, job_id)))
            record = self.job(user, job_id)
        return record


def _bytes_in(directory: Path) -> int:
    try:
        return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    except OSError:
        return 0


def _check_ttl(ttl_seconds: float | None) -> None:
    if ttl_seconds is not None and not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise invalid(("ttl_seconds",), f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS} (ten years), or null")


def _remove_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass  # not empty (a stray folder an operator put there), or already gone


def _request_hash(kind: str, run_id: str | None, request: Any) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value.model_dump(mode="json") if hasattr(value, "model_dump") else value

    payload = json.dumps([kind, run_id, plain(request)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _check_unicode(request: Any) -> None:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer accepts: a prompt,
    message, response or stop string holding one would make the request a 500 (or its job fail
    later). Refuse them up front, naming the field."""

    def walk(value: Any, loc: tuple) -> None:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise invalid(loc, f"text is not valid Unicode: lone surrogate at position {exc.start}") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*loc, key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, (*loc, i))

    walk(request.model_dump(), ())
