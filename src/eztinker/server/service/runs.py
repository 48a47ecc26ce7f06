"""Runs: creating, listing (with status, last loss, activity and checkpoints), their curves and
jobs, deleting; and the evaluations a harness reports of them."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from ...backend import InvalidInput
from ...backend.commands import CreateRun, DeleteRun
from ...backend.results import JobKind
from ...types import (
    CheckpointInfo,
    CreateRunRequest,
    EvaluationInfo,
    EvaluationReport,
    JobInfo,
    JobRef,
    JobStatus,
    MetricPoint,
    RunInfo,
    RunMetrics,
)
from ..records import INTERRUPTED, RunRecord, new_id, utc, utc_or_none
from ..runner import Job
from .checkpoints import CheckpointsPart
from .core import MAX_SEED, _request_hash
from .errors import LimitExceeded, ServiceError, invalid, not_found


class RunsPart(CheckpointsPart):
    def get_run(self, user: str, run_id: str) -> RunInfo:
        return self._run_infos(user, [self.owned_run(user, run_id)])[0]

    def list_runs(self, user: str) -> list[RunInfo]:
        return self._run_infos(user, self.store.live_runs(user))

    def _run_infos(self, user: str, runs: list[RunRecord]) -> list[RunInfo]:
        """The runs with their status, last loss, last activity and checkpoints: five queries
        however many of the user's runs (for one run, they read that run's rows alone)."""
        run_id = runs[0].id if len(runs) == 1 else None
        losses, activity = self.store.last_losses(user, run_id), self.store.last_activity(user, run_id)
        busy: dict[str, set[JobKind]] = {}
        for job in self.store.unfinished_jobs(user, run_id):
            if job.run_id is not None:
                busy.setdefault(job.run_id, set()).add(job.kind)
        now = time.time()
        checkpoints: dict[str, list[CheckpointInfo]] = {}
        for checkpoint in self.store.checkpoints_of(user, run_id):
            if not checkpoint.expired(now):  # expired: unlisted at once, before the sweep deletes it
                checkpoints.setdefault(checkpoint.run_id, []).append(checkpoint.info())
        infos = []
        for run in runs:
            kinds = busy.get(run.id, set())
            status = (
                "unavailable"
                if run.base_model not in self.models
                else "creating"
                if JobKind.create_run in kinds
                else "working"
                if kinds
                else "idle"
            )
            loss = losses.get(run.id)
            infos.append(
                RunInfo(
                    id=run.id,
                    base_model=run.base_model,
                    lora=run.lora,
                    step=run.step,
                    created_at=utc(run.created_at),
                    restored_from=run.restored_from,
                    checkpoints=checkpoints.get(run.id, []),
                    status=status,
                    last_loss=loss.loss / loss.tokens if loss is not None and loss.tokens else None,
                    updated_at=utc_or_none(activity.get(run.id)),
                )
            )
        return infos

    def run_metrics(self, user: str, run_id: str) -> RunMetrics:
        """The run's curve: one point per optimizer step, from the training log."""
        self.owned_run(user, run_id)
        points: dict[int, dict[str, Any]] = {}
        for entry in self.store.training_log(run_id):
            point = points.setdefault(entry.step, {"step": entry.step})
            point["recorded_at"] = entry.recorded_at
            if entry.kind == "optim_step":
                point.update(grad_norm=entry.grad_norm, learning_rate=entry.learning_rate)
            elif entry.loss is not None:
                num_tokens = entry.num_tokens or 0
                point["loss"] = point.get("loss", 0.0) + entry.loss
                point["num_tokens"] = point.get("num_tokens", 0) + num_tokens
                # cross_entropy: divided by its weights' sum (a mean NLL per token whatever the
                # weights' scale); the RL losses and rows logged before weight sums: by the tokens.
                weight = entry.weight_sum if entry.weight_sum is not None else num_tokens
                point["weight_sum"] = point.get("weight_sum", 0.0) + weight
        for point in points.values():
            if point.get("weight_sum"):
                point["loss_per_token"] = point["loss"] / point["weight_sum"]
            point["recorded_at"] = utc(point["recorded_at"])
        return RunMetrics(run_id=run_id, points=[MetricPoint(**points[step]) for step in sorted(points)])

    def run_jobs(self, user: str, run_id: str, limit: int) -> list[JobInfo]:
        """The run's newest jobs, queued and running ones first (their results left out)."""
        self.owned_run(user, run_id)
        unfinished = self.store.unfinished_jobs(user, run_id)
        seen = {job.id for job in unfinished}
        recent = [job for job in self.store.recent_jobs(user, run_id, limit) if job.id not in seen]
        jobs = [*reversed(unfinished), *recent][: max(limit, len(unfinished))]
        return [job.info(with_result=False) for job in jobs]

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
            state = self.checkpoint_state(source, "from_checkpoint")
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
            if existing.status is JobStatus.failed and existing.error == INTERRUPTED:
                # A create retried across a server restart (the SDK reuses its key) must not replay the
                # interrupted attempt's failure: that attempt has no effect, so create afresh.
                self.store.release_idempotency_key(existing.job_id)
            else:
                return self._replay(existing, digest, key)
        if run_id is not None and (taken := self.store.run_any(run_id)) is not None:
            if taken.owner != user or taken.deleted:
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
        create = self.store.create_job_of(run_id, user)
        if create is not None:
            return JobRef(job_id=create.id, status=create.status)
        job_id = new_id("job")  # its create job has expired: a completed stand-in
        self.store.add_job(job_id, user, run_id, "create_run")
        self.store.mark_finished(job_id, result=json.dumps({"run_id": run_id, "step": 0}))
        return JobRef(job_id=job_id, status=JobStatus.completed)

    async def delete_run(self, user: str, run_id: str) -> None:
        run = self.owned_run(user, run_id)
        self.store.mark_run_deleted(run_id)  # new requests for it get 404 from now on
        if run.base_model in self.models:  # else it was never rebuilt in this server
            # Queued behind the run's pending jobs, so they finish first.
            await self._submit_and_wait(user, Job(new_id("job"), DeleteRun(model=run.base_model, run_id=run_id)))
        # Its checkpoints go with it (runs that loaded one restore from their own snapshot of it); a
        # crash before this is made good by the sweep at the next start. Off the event loop: a
        # run's folders can be many.
        await asyncio.to_thread(self._remove_checkpoints_of, run_id)

    # -------------------------------------------------------------------------- evaluations
    def record_evaluation(self, user: str, run_id: str, report: EvaluationReport) -> EvaluationInfo:
        """Record what a harness scored of the run's live adapter or one of its checkpoints."""
        run = self.owned_run(user, run_id)
        if report.checkpoint is None:
            step = run.step
        else:
            checkpoint = self.store.checkpoint(run_id, report.checkpoint)
            if checkpoint is None:
                raise not_found(f"checkpoint {run_id}/{report.checkpoint}")
            step = checkpoint.step
        if set(report.scores) - set(report.tasks):
            extra = sorted(set(report.scores) - set(report.tasks))
            raise invalid(("scores",), f"scores for tasks not listed in tasks: {extra}")
        evaluation_id = new_id("eval")
        created = self.store.add_evaluation(
            evaluation_id, run_id, report.checkpoint, step, report.model_dump_json(exclude={"checkpoint"})
        )
        return EvaluationInfo(
            id=evaluation_id, run_id=run_id, step=step, created_at=utc(created), **report.model_dump()
        )

    def evaluations(self, user: str, run_id: str) -> list[EvaluationInfo]:
        """The run's recorded evaluations, oldest first."""
        self.owned_run(user, run_id)
        return [
            EvaluationInfo(
                id=evaluation.id,
                run_id=evaluation.run_id,
                checkpoint=evaluation.checkpoint,
                step=evaluation.step,
                created_at=utc(evaluation.created_at),
                **evaluation.report,
            )
            for evaluation in self.store.evaluations(run_id)
        ]
