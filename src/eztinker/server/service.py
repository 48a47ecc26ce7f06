"""The service layer: owns the engine, the store and the job runner; turns validated requests
into jobs. Routes (app.py) only parse HTTP and call this."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from .. import __version__
from ..chat import render_prompt
from ..engine import BaseModel, Engine, EngineError, SampleSpec
from ..engine.checkpoints import remove_partial_writes
from ..engine.engine import ADAPTER_WEIGHTS, OPTIMIZER_STATE, read_training_state
from ..types import (
    CreateRunRequest,
    ForwardBackwardRequest,
    HealthInfo,
    JobInfo,
    JobRef,
    JobStatus,
    LoadRequest,
    LoraConfig,
    OptimStepRequest,
    Prompt,
    RunInfo,
    SampleRequest,
    SampleResult,
    SaveRequest,
    ScoreRequest,
    ScoreResult,
    parse_checkpoint_ref,
)
from .jobs import Job, JobRunner
from .settings import ServerSettings
from .store import INTERRUPTED, Store, new_id

log = logging.getLogger(__name__)

# Seeds are stored as SQLite INTEGERs and fed to torch.manual_seed; either raises OverflowError above this,
# and the schema has no upper bound, so checking it up front answers 422 rather than 500.
MAX_SEED = 2**63 - 1


class ServiceError(Exception):
    """Maps to an HTTP error: status, message, and (for 422) the offending field's location."""

    def __init__(self, status: int, message: str, loc: tuple | None = None):
        super().__init__(message)
        self.status, self.message, self.loc = status, message, loc


def not_found(what: str) -> ServiceError:
    return ServiceError(404, f"{what} not found")


def invalid(loc: tuple, message: str) -> ServiceError:
    return ServiceError(422, message, ("body", *loc))


class Service:
    def __init__(self, settings: ServerSettings, base: BaseModel):
        self.settings = settings
        self.base = base
        self.engine = Engine(base)
        data_dir = Path(settings.data_dir)
        self.checkpoint_root = (data_dir / "checkpoints").resolve()
        self.store = Store(data_dir / "eztinker.sqlite3")
        self._lora_targets = _lora_targets(base.model)
        self.runner = JobRunner(
            self.engine,
            self.store,
            job_ttl_seconds=settings.job_ttl_seconds,
            max_finished_jobs=settings.max_finished_jobs,
        )
        self._restore()

    # --------------------------------------------------------------------------- life cycle
    def _restore(self) -> None:
        """After a restart: drop half-written checkpoints, fail interrupted jobs, rebuild runs."""
        for leftover in remove_partial_writes(self.checkpoint_root):
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
        for row in self.store.live_runs():
            lora = LoraConfig.model_validate_json(row["lora"])
            self.engine.create_run(row["id"], lora, row["seed"])
            ref, step = row["resume_from"], 0
            if ref is None and row["step"]:
                log.warning("run %s was never saved; its adapter restarts from step 0", row["id"])
            if ref is not None:
                try:
                    source_run, name = parse_checkpoint_ref(ref, default_run=row["id"])
                    checkpoint = self.store.checkpoint(source_run, name)
                    if checkpoint is None:
                        raise EngineError(f"checkpoint {ref} is not recorded")
                    path = self.checkpoint_root.parent / checkpoint.path
                    verify_checkpoint(path, ref)
                    step = self.engine.load(row["id"], path)
                # Catch everything: a corrupted adapter file raises SafetensorError, a truncated
                # optimizer.pt EOFError or UnpicklingError, and none of them may stop the server starting.
                except Exception as exc:
                    log.error("run %s: could not restore %s (%s); it restarts from step 0", row["id"], ref, exc)
                    ref, step = None, 0
                    # A load that failed part-way may have replaced some tensors: start afresh.
                    self.engine.delete_run(row["id"])
                    self.engine.create_run(row["id"], lora, row["seed"])
            self.store.set_run_state(row["id"], step, restored_from=ref)

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
                        step = int(read_training_state(directory)["step"])
                    except (EngineError, KeyError, TypeError, ValueError):
                        continue  # unreadable: a load of it fails with a clear error
                    if step != recorded[directory.name]:
                        log.warning("checkpoint %s was overwritten by an interrupted save; it holds step %d",
                                    directory, step)
                        self.store.set_checkpoint_step(run_dir.name, directory.name, step)
                if directory.is_dir() and not directory.is_symlink() and directory.name not in recorded:
                    log.warning("removed checkpoint %s: its save was interrupted before it was recorded", directory)
                    shutil.rmtree(directory, ignore_errors=True)

    def ensure_started(self) -> None:
        if not self.runner.started:
            self.runner.start(asyncio.get_running_loop())

    def close(self) -> None:
        self.runner.stop()
        self.store.close()

    def health(self) -> HealthInfo:
        return HealthInfo(
            model=self.base.name,
            runs=len(self.store.live_runs()),
            queued_jobs=self.runner.queued,
            version=__version__,
        )

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model": self.base.name,
            "vocab_size": self.base.vocab_size,
            "stop_token_ids": sorted(self.base.stop_token_ids),
            "limits": {
                "max_new_tokens": s.max_new_tokens,
                "max_prompt_tokens": s.max_prompt_tokens,
                "max_batch_examples": s.max_batch_examples,
                "max_samples_per_request": s.max_samples_per_request,
                "max_request_bytes": s.max_request_bytes,
            },
        }

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.base.tokenizer

    # --------------------------------------------------------------------------------- runs
    def _owned_run(self, user: str, run_id: str) -> sqlite3.Row:
        row = self.store.run_row(run_id)
        if row is None or row["owner"] != user:  # another user's run is as good as absent
            raise not_found(f"run {run_id}")
        return row

    def get_run(self, user: str, run_id: str) -> RunInfo:
        return self.store.run_info(self._owned_run(user, run_id))

    def list_runs(self, user: str) -> list[RunInfo]:
        return [self.store.run_info(row) for row in self.store.live_runs(user)]

    async def create_run(self, user: str, request: CreateRunRequest, key: str | None = None) -> RunInfo:
        if request.base_model is not None and request.base_model != self.base.name:
            raise invalid(
                ("base_model",),
                f"this server serves {self.base.name!r}, not {request.base_model!r} (one base model per server)",
            )
        if request.seed > MAX_SEED:
            raise invalid(("seed",), f"seed {request.seed} is above the largest allowed, {MAX_SEED}")
        lora, source = request.lora, None
        if request.from_checkpoint is not None:
            source, _ = self._checkpoint(user, request.from_checkpoint, default_run=None, field="from_checkpoint")
            try:
                lora = LoraConfig.model_validate(read_training_state(source)["lora"])
            except (EngineError, KeyError, TypeError, ValueError) as exc:
                raise invalid(("from_checkpoint",), f"unreadable checkpoint: {exc}") from None
        self._check_target_modules(lora, "from_checkpoint" if source is not None else "lora")
        digest = _request_hash("create_run", None, request) if key else None
        if key and (existing := self.store.job_by_key(user, key)) is not None:
            if existing["status"] == JobStatus.failed.value and existing["error"] == INTERRUPTED:
                # A create retried across a server restart (the SDK reuses its key) must not replay the
                # interrupted attempt's failure: that attempt has no effect, so create afresh.
                self.store.release_idempotency_key(existing["id"])
            else:
                return await self._replayed_run(user, existing, digest, key)
        run_id = new_id("run")
        self.store.add_run(run_id, user, self.base.name, lora, request.seed)

        def work() -> dict:
            self.engine.create_run(run_id, lora, request.seed)
            if source is not None:
                verify_checkpoint(source, request.from_checkpoint)
                step = self.engine.load(run_id, source)
                self.store.set_run_state(run_id, step, restored_from=request.from_checkpoint)
                self.store.set_resume_point(run_id, request.from_checkpoint)
            return {"run_id": run_id}

        try:
            job = await self._submit_and_wait(user, run_id, "create_run", work, key, digest)
        except sqlite3.IntegrityError:  # the same key raced in from a concurrent retry
            self.store.mark_run_deleted(run_id)
            return await self._replayed_run(user, self.store.job_by_key(user, key), digest, key)
        if job.status is not JobStatus.completed:
            self.store.mark_run_deleted(run_id)
            field = ("from_checkpoint",) if source is not None else ("lora",)
            raise invalid(field, job.error or "could not create the run")
        return self.get_run(user, run_id)

    async def _replayed_run(self, user: str, existing: sqlite3.Row, digest: str | None, key: str) -> RunInfo:
        """A retried create: the run the first attempt made (waiting for it if need be)."""
        self._replay(existing, digest, key)
        job = await self.wait_job(user, existing["id"], 60)
        while job.status in (JobStatus.pending, JobStatus.running):
            job = await self.wait_job(user, existing["id"], 60)
        if job.status is JobStatus.failed:
            raise invalid(("lora",), job.error or "could not create the run")
        return self.get_run(user, existing["run_id"])

    async def delete_run(self, user: str, run_id: str) -> None:
        self._owned_run(user, run_id)
        self.store.mark_run_deleted(run_id)  # new requests for it get 404 from now on
        # Queued behind the run's pending jobs, so they finish first.
        await self._submit_and_wait(user, run_id, "delete_run", lambda: self.engine.delete_run(run_id))

    # --------------------------------------------------------------------------------- jobs
    def submit_forward_backward(self, user: str, run_id: str, request: ForwardBackwardRequest, key: str | None) -> JobRef:
        self._owned_run(user, run_id)
        limits = self.settings
        if len(request.data) > limits.max_batch_examples:
            raise invalid(("data",), f"{len(request.data)} examples; the limit is {limits.max_batch_examples}")
        for i, datum in enumerate(request.data):
            loc = ("data", i, "model_input", "tokens")
            self._check_tokens(datum.model_input.tokens, loc)
            self._check_tokens(datum.loss_fn_inputs.target_tokens, ("data", i, "loss_fn_inputs", "target_tokens"))
        work = lambda: self.engine.forward_backward(run_id, request.data, request.loss_fn).model_dump()
        return self._submit(user, run_id, "forward_backward", request, key, work=work)

    def submit_optim_step(self, user: str, run_id: str, request: OptimStepRequest, key: str | None) -> JobRef:
        self._owned_run(user, run_id)

        def work() -> dict:
            result = self.engine.optim_step(run_id, request.adam_params)
            self.store.set_run_state(run_id, result.step)
            return result.model_dump()

        return self._submit(user, run_id, "optim_step", request, key, work=work)

    def submit_sample(self, user: str, run_id: str | None, request: SampleRequest, key: str | None) -> JobRef:
        if run_id is not None:
            self._owned_run(user, run_id)
        _check_unicode(request)
        params = request.sampling_params
        if params.seed is not None and params.seed > MAX_SEED:
            raise invalid(("sampling_params", "seed"), f"seed {params.seed} is above the largest allowed, {MAX_SEED}")
        if params.max_tokens > self.settings.max_new_tokens:
            raise invalid(
                ("sampling_params", "max_tokens"),
                f"max_tokens {params.max_tokens} is above the limit {self.settings.max_new_tokens}",
            )
        total = len(request.prompts) * request.num_samples
        if total > self.settings.max_samples_per_request:
            raise invalid(
                ("num_samples",),
                f"{len(request.prompts)} prompts x {request.num_samples} samples = {total} candidates; "
                f"the limit is {self.settings.max_samples_per_request}",
            )
        prompts = [self.encode_prompt(p, ("prompts", i)) for i, p in enumerate(request.prompts)]
        spec = SampleSpec(adapter=run_id, prompts=prompts, num_samples=request.num_samples, params=params)

        def finish(sequences) -> dict:
            return SampleResult(prompt_tokens=prompts, sequences=sequences).model_dump()

        return self._submit(user, run_id, "sample", request, key, sample_spec=spec, finish_sample=finish)

    def submit_score(self, user: str, run_id: str | None, request: ScoreRequest, key: str | None) -> JobRef:
        if run_id is not None:
            self._owned_run(user, run_id)
        _check_unicode(request)
        prompt = self.encode_prompt(request.prompt, ("prompt",))
        responses = [self.tokenizer.encode(r, add_special_tokens=False) for r in request.responses]
        for i, tokens in enumerate(responses):
            if len(prompt) + len(tokens) > self.settings.max_prompt_tokens:
                raise invalid(("responses", i), f"prompt + response exceed {self.settings.max_prompt_tokens} tokens")

        def work() -> dict:
            return ScoreResult(scores=self.engine.score(run_id, prompt, responses)).model_dump()

        return self._submit(user, run_id, "evaluate", request, key, work=work)

    def submit_save(self, user: str, run_id: str, request: SaveRequest, key: str | None) -> JobRef:
        self._owned_run(user, run_id)
        relative = Path("checkpoints") / run_id / request.name
        target = self.checkpoint_root.parent / relative
        # A run's checkpoint folder that is a symlink to elsewhere would be written through;
        # loads refuse such paths, so saves must too.
        if target.parent.exists() and not target.parent.resolve().is_relative_to(self.checkpoint_root):
            raise invalid(("name",), f"checkpoint {run_id}/{request.name} is not inside the data directory")

        job_id = new_id("job")

        def work() -> dict:
            self.engine.save(run_id, target)
            step = self.engine.step_of(run_id)
            # The checkpoint row, the run's resume point and the job's completion go in one commit: a
            # SIGKILL between separate commits would leave a listed checkpoint whose job says
            # "interrupted: its effect was not applied".
            checkpoint = self.store.record_save(job_id, run_id, request.name, str(relative), step)
            return checkpoint.model_dump(mode="json")

        return self._submit(user, run_id, "save", request, key, work=work, job_id=job_id)

    def submit_load(self, user: str, run_id: str, request: LoadRequest, key: str | None) -> JobRef:
        self._owned_run(user, run_id)
        path, ref = self._checkpoint(user, request.checkpoint, default_run=run_id, field="checkpoint")

        def work() -> dict:
            # Read every file first, so a bad checkpoint fails the job with a clear error and the run
            # untouched, rather than a bare "SafetensorError: ..." or a failure after the adapter is
            # replaced but before the optimizer state is.
            verify_checkpoint(path, ref)
            step = self.engine.load(run_id, path)
            result = {"step": step, "restored_from": ref}
            self.store.record_load(job_id, run_id, step, ref, result)  # one commit, as for save
            return result

        job_id = new_id("job")
        return self._submit(user, run_id, "load", request, key, work=work, job_id=job_id)

    def _checkpoint(self, user: str, ref: str, default_run: str | None, field: str) -> tuple[Path, str]:
        try:
            source_run, name = parse_checkpoint_ref(ref, default_run=default_run or "")
        except ValueError as exc:
            raise invalid((field,), str(exc)) from None
        owner = self.store.run_owner(source_run)
        checkpoint = self.store.checkpoint(source_run, name) if owner == user else None
        if checkpoint is None:
            raise not_found(f"checkpoint {source_run}/{name}")
        path = (self.checkpoint_root.parent / checkpoint.path).resolve()
        if not path.is_relative_to(self.checkpoint_root) or not path.is_dir():
            # A symlink or edited record pointing outside the data directory is refused.
            raise invalid((field,), f"checkpoint {source_run}/{name} is not inside the data directory")
        return path, f"{source_run}/{name}"

    def _check_target_modules(self, lora: LoraConfig, field: str) -> None:
        """LoRA target modules are checked here, before the engine sees them: peft accepts some
        that break the shared model for everyone. ['embed_tokens'] fails half-way and leaves
        every run on the server (existing and new) unable to train or sample; 'lm_head' makes a
        run that can never train; ['q_proj', 'mlp'] leaves stray layers behind; a string other
        than 'all-linear' is taken as a regular expression."""
        targets = lora.target_modules
        loc = (field, "target_modules") if field == "lora" else (field,)
        linear, other = self._lora_targets
        choices = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear}))
        if isinstance(targets, str):
            if targets != "all-linear":
                raise invalid(loc, f"target_modules must be 'all-linear' or a list of module names ({choices})")
            return
        for i, key in enumerate(targets):
            def matches(name: str) -> bool:  # peft's rule for a list of names
                return name == key or name.endswith("." + key)

            bad = next((name for name in other if matches(name)), None)
            if bad is not None:
                raise invalid((*loc, i), f"target module {key!r} matches {bad!r}, which is not a LoRA-trainable "
                                         f"linear layer; choose from {choices}")
            if not any(matches(name) for name in linear):
                raise invalid((*loc, i), f"target module {key!r} is not in the model; choose from {choices}")

    # ---------------------------------------------------------------------------- plumbing
    def encode_prompt(self, prompt: Prompt, loc: tuple) -> list[int]:
        if prompt.tokens is not None:
            tokens = prompt.tokens
        elif prompt.messages is not None:
            tokens = render_prompt(self.tokenizer, prompt.messages)
        else:
            tokens = self.tokenizer.encode(prompt.text, add_special_tokens=False)
            if not tokens:
                raise invalid((*loc, "text"), "text encodes to no tokens")
        self._check_tokens(tokens, (*loc, "tokens"))
        return tokens

    def _check_tokens(self, tokens: list[int], loc: tuple) -> None:
        if len(tokens) > self.settings.max_prompt_tokens:
            raise invalid(loc, f"{len(tokens)} tokens; the limit is {self.settings.max_prompt_tokens}")
        vocab = self.base.vocab_size
        for position, token in enumerate(tokens):
            if not 0 <= token < vocab:
                raise invalid((*loc, position), f"token id {token} is outside the vocabulary [0, {vocab})")

    def _submit(
        self, user: str, run_id: str | None, kind: str, request: Any, key: str | None, job_id: str | None = None,
        **job_fields,
    ) -> JobRef:
        digest = _request_hash(kind, run_id, request) if key else None
        if key:
            existing = self.store.job_by_key(user, key)
            if existing is not None:
                return self._replay(existing, digest, key)
        job = Job(job_id or new_id("job"), run_id, kind, **job_fields)
        try:
            self.store.add_job(job.id, user, run_id, kind, key, digest)
        except sqlite3.IntegrityError:  # the same key raced in from a concurrent retry
            return self._replay(self.store.job_by_key(user, key), digest, key)
        self.ensure_started()
        self.runner.submit(job)
        return JobRef(job_id=job.id, status=JobStatus.pending)

    @staticmethod
    def _replay(existing: sqlite3.Row, digest: str | None, key: str) -> JobRef:
        if existing["request_hash"] != digest:
            raise ServiceError(409, f"Idempotency-Key {key!r} was already used for a different request")
        return JobRef(job_id=existing["id"], status=JobStatus(existing["status"]))

    async def _submit_and_wait(
        self, user: str, run_id: str, kind: str, work, key: str | None = None, digest: str | None = None
    ) -> JobInfo:
        job_id = new_id("job")
        self.store.add_job(job_id, user, run_id, kind, key, digest)
        self.ensure_started()
        self.runner.submit(Job(job_id, run_id, kind, work=work))
        while (info := self.job(user, job_id)).status in (JobStatus.pending, JobStatus.running):
            await self.runner.wait(job_id, 60)
        return info

    def job(self, user: str, job_id: str) -> JobInfo:
        row = self.store.job_row(job_id)
        if row is None or row["owner"] != user:
            raise not_found(f"job {job_id}")
        return self.store.job_info(row)

    async def wait_job(self, user: str, job_id: str, wait: float) -> JobInfo:
        info = self.job(user, job_id)
        if info.status in (JobStatus.pending, JobStatus.running) and wait > 0:
            self.ensure_started()
            await self.runner.wait(job_id, wait)
            info = self.job(user, job_id)
        return info


def _request_hash(kind: str, run_id: str | None, request: Any) -> str:
    payload = json.dumps([kind, run_id, request.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def verify_checkpoint(directory: Path, ref: str) -> None:
    """Read every file of a checkpoint (adapter, optimizer state, training state) without
    applying it; raise EngineError naming the broken file. weights_only: never unpickles code."""
    read_training_state(directory)
    for name, read in (
        (ADAPTER_WEIGHTS, lambda path: load_file(path)),
        (OPTIMIZER_STATE, lambda path: torch.load(path, weights_only=True, map_location="cpu")),
    ):
        try:
            read(directory / name)
        except Exception as exc:
            raise EngineError(
                f"checkpoint {ref} is corrupted or incomplete: {name} cannot be read ({type(exc).__name__}: {exc})"
            ) from None


def _lora_targets(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Module names of the bare base model: (linear layers LoRA may adapt, every other module).
    The output head is "other": the engine computes logits from its weight directly, and it may
    share that weight with the input embeddings."""
    head = model.get_output_embeddings()
    linear, other = [], []
    for name, module in model.named_modules():
        if not name or ".lora_" in name or ".base_layer" in name or ".lora_dropout" in name:
            continue  # the root, and peft's own submodules if the model is already wrapped
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, torch.nn.Linear) and layer is not head and module is not head:
            linear.append(name)
        else:
            other.append(name)
    return linear, other


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
