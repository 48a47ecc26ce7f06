"""A run's recorded evaluations (`/v1/runs/{run_id}/evaluations`): what a harness such as lm-eval
scored its live adapter or one of its checkpoints. The server does not run the harness: the client
that ran it (`eztinker eval`, a recipe's `--eval-tasks`) reports the scores here, so the dashboard's
run page lists them beside the run's curves and checkpoints."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from fastapi import APIRouter

from ..types import EvaluationInfo, EvaluationReport
from .auth import User
from .service import Service, invalid, not_found
from .store import new_id


def evaluations_router(service: Service) -> APIRouter:
    router = APIRouter(tags=["runs"])

    @router.post(
        "/v1/runs/{run_id}/evaluations",
        response_model=EvaluationInfo,
        summary="Record a harness's scores for the run's live adapter or one of its checkpoints",
    )
    def record(run_id: str, report: EvaluationReport, user: User) -> EvaluationInfo:
        row = service.owned_run(user, run_id)
        if report.checkpoint is None:
            step = row["step"]
        else:
            checkpoint = service.store.checkpoint(run_id, report.checkpoint)
            if checkpoint is None:
                raise not_found(f"checkpoint {run_id}/{report.checkpoint}")
            step = checkpoint.step
        if set(report.scores) - set(report.tasks):
            extra = sorted(set(report.scores) - set(report.tasks))
            raise invalid(("scores",), f"scores for tasks not listed in tasks: {extra}")
        evaluation_id = new_id("eval")
        created = service.store.add_evaluation(
            evaluation_id, run_id, report.checkpoint, step, report.model_dump_json(exclude={"checkpoint"})
        )
        return EvaluationInfo(
            id=evaluation_id,
            run_id=run_id,
            step=step,
            created_at=datetime.fromtimestamp(created, tz=timezone.utc),
            **report.model_dump(),
        )

    @router.get(
        "/v1/runs/{run_id}/evaluations",
        response_model=list[EvaluationInfo],
        summary="The run's recorded evaluations, oldest first",
    )
    def listed(run_id: str, user: User) -> list[EvaluationInfo]:
        service.owned_run(user, run_id)
        return [
            EvaluationInfo(
                id=r["id"],
                run_id=r["run_id"],
                checkpoint=r["checkpoint"],
                step=r["step"],
                created_at=datetime.fromtimestamp(r["created_at"], tz=timezone.utc),
                **json.loads(r["report"]),
            )
            for r in service.store.evaluations(run_id)
        ]

    return router
