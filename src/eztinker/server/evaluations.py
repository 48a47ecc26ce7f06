"""A run's recorded evaluations (`/v1/runs/{run_id}/evaluations`): what a harness such as lm-eval
scored its live adapter or one of its checkpoints. The server does not run the harness: the client
that ran it (`eztinker eval`, a recipe's `--eval-tasks`) reports the scores here, so the dashboard's
run page lists them beside the run's curves and checkpoints."""

from __future__ import annotations

from fastapi import APIRouter

from ..types import EvaluationInfo, EvaluationReport
from .auth import User
from .service import Service


def evaluations_router(service: Service) -> APIRouter:
    router = APIRouter(tags=["runs"])

    @router.post(
        "/v1/runs/{run_id}/evaluations",
        response_model=EvaluationInfo,
        summary="Record a harness's scores for the run's live adapter or one of its checkpoints",
    )
    def record(run_id: str, report: EvaluationReport, user: User) -> EvaluationInfo:
        return service.record_evaluation(user, run_id, report)

    @router.get(
        "/v1/runs/{run_id}/evaluations",
        response_model=list[EvaluationInfo],
        summary="The run's recorded evaluations, oldest first",
    )
    def listed(run_id: str, user: User) -> list[EvaluationInfo]:
        return service.evaluations(user, run_id)

    return router
