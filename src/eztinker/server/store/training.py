"""A run's history: the training log (its curves) and the evaluations a harness reported."""

from __future__ import annotations

import json
import sqlite3
import time

from ..records import EvaluationRecord, LastLoss, TrainingLogEntry
from .database import Database, json_object, run_scope
from .jobs import completion


def _log_entry(row: sqlite3.Row) -> TrainingLogEntry:
    return TrainingLogEntry(
        job_id=row["job_id"],
        run_id=row["run_id"],
        step=row["step"],
        kind=row["kind"],
        recorded_at=row["recorded_at"],
        loss=row["loss"],
        num_tokens=row["num_tokens"],
        weight_sum=row["weight_sum"],
        grad_norm=row["grad_norm"],
        learning_rate=row["learning_rate"],
    )


class TrainingLog(Database):
    def record_step(self, job_id: str, run_id: str, result: dict) -> None:
        """In one transaction: the run's step, its grad norm and learning rate in the training
        log, the job completed."""
        self.transaction(
            [
                ("UPDATE runs SET step = ? WHERE id = ?", (result["step"], run_id)),
                (
                    "INSERT OR REPLACE INTO training_log (job_id, run_id, step, kind, grad_norm, learning_rate, "
                    "recorded_at)"
                    " VALUES (?, ?, ?, 'optim_step', ?, ?, ?)",
                    (job_id, run_id, result["step"], result["grad_norm"], result["learning_rate"], time.time()),
                ),
                *completion(job_id, json.dumps(result)),
            ]
        )

    def record_forward_backward(
        self, job_id: str, run_id: str, result_json: str, loss: float, num_tokens: int, weight_sum: float | None = None
    ) -> None:
        """In one transaction: the batch's loss in the training log (at the step its gradient
        goes into), the job completed. `weight_sum`: cross_entropy's summed weights, which
        turn its weighted loss into a mean NLL per token (None for the RL losses)."""
        self.transaction(
            [
                (
                    "INSERT OR REPLACE INTO training_log"
                    " (job_id, run_id, step, kind, loss, num_tokens, weight_sum, recorded_at) SELECT ?, id, "
                    "step + 1, 'forward_backward', ?, ?, ?, ? FROM runs WHERE id = ?",
                    (job_id, loss, num_tokens, weight_sum, time.time(), run_id),
                ),
                *completion(job_id, result_json),
            ]
        )

    def training_log(self, run_id: str) -> list[TrainingLogEntry]:
        rows = self.query("SELECT * FROM training_log WHERE run_id = ? ORDER BY step, recorded_at", (run_id,))
        return [_log_entry(row) for row in rows]

    def last_losses(self, owner: str, run_id: str | None = None) -> dict[str, LastLoss]:
        """Per run of the owner (or only `run_id`): its newest step with a forward_backward."""
        scope, args = run_scope("t.run_id", owner, run_id)
        rows = self.query(
            "SELECT l.run_id, l.step, SUM(l.loss) AS loss, SUM(COALESCE(l.weight_sum, l.num_tokens)) AS tokens"
            " FROM training_log l"
            " JOIN (SELECT t.run_id, MAX(t.step) AS step FROM training_log t JOIN runs r ON r.id = t.run_id"
            f"       WHERE {scope} AND t.kind = 'forward_backward' GROUP BY t.run_id) newest"
            " ON newest.run_id = l.run_id AND newest.step = l.step"
            " WHERE l.kind = 'forward_backward' GROUP BY l.run_id, l.step",
            args,
        )
        return {r["run_id"]: LastLoss(step=r["step"], loss=r["loss"], tokens=r["tokens"]) for r in rows}

    def last_activity(self, owner: str, run_id: str | None = None) -> dict[str, float]:
        """Per run of the owner (or only `run_id`): when it last trained or saved (absent: never
        since its creation)."""
        log_scope, log_args = run_scope("l.run_id", owner, run_id)
        saved_scope, saved_args = run_scope("c.run_id", owner, run_id)
        rows = self.query(
            "SELECT run_id, MAX(t) AS t FROM ("
            f" SELECT l.run_id, l.recorded_at AS t FROM training_log l JOIN runs r ON r.id = l.run_id WHERE {log_scope}"
            " UNION ALL SELECT c.run_id, c.created_at FROM checkpoints c JOIN runs r ON r.id = c.run_id WHERE "
            f"{saved_scope}"
            ") GROUP BY run_id",
            (*log_args, *saved_args),
        )
        return {r["run_id"]: r["t"] for r in rows}

    def add_evaluation(self, evaluation_id: str, run_id: str, checkpoint: str | None, step: int, report: str) -> float:
        """`report`: the harness's report as JSON; returns when it was recorded."""
        created = time.time()
        self.execute(
            "INSERT INTO evaluations (id, run_id, checkpoint, step, report, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (evaluation_id, run_id, checkpoint, step, report, created),
        )
        return created

    def evaluations(self, run_id: str) -> list[EvaluationRecord]:
        rows = self.query("SELECT * FROM evaluations WHERE run_id = ? ORDER BY created_at, rowid", (run_id,))
        return [
            EvaluationRecord(
                id=r["id"],
                run_id=r["run_id"],
                checkpoint=r["checkpoint"],
                step=r["step"],
                report=json_object(r["report"]),
                created_at=r["created_at"],
            )
            for r in rows
        ]
