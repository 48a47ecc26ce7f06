"""What a finished command leaves in the store: its job's result or error, and its effect on the
run (a save's checkpoint, a load's snapshot, a step's metrics), with the snapshots of loaded
checkpoints that runs restore from, kept by hard links. The runner's lanes call it for each outcome.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic_writes import fsync
from ..backend.commands import CreateRun, DeleteRun, ForwardBackward, Load, OptimStep, Outcome, Save
from ..backend.results import (
    ForwardBackwardResult,
    Loaded,
    OptimStepResult,
    RunCreated,
    RunDeleted,
    Saved,
    dump_result,
)
from .store import Store

if TYPE_CHECKING:
    from .runner import Job

SNAPSHOTS = "snapshots"  # <data_dir>/snapshots/<run_id>/<job_id>: what each run last loaded


def hide_paths(text: str, data_dir: Path, checkpoint_root: Path | None = None) -> str:
    """`text` with the data directory's paths made relative: to its checkpoints folder (a
    checkpoint then reads as its reference, '<run_id>/<name>'), else to itself. Errors reach
    clients, who are not to learn the server's file layout (an OS error names the full path)."""
    checkpoints = checkpoint_root or data_dir / "checkpoints"
    return (
        text.replace(f"{checkpoints}{os.sep}", "")
        .replace(f"{data_dir}{os.sep}", "")
        .replace(str(data_dir), "<data-dir>")
    )


def stored_path(path: Path, data_dir: Path) -> str:
    """How the store records a checkpoint or snapshot directory: relative to the data directory
    when inside it (the data directory can move), else absolute (a shared --checkpoint-dir);
    `data_dir / stored` gives the directory back either way."""
    return str(path.relative_to(data_dir)) if path.is_relative_to(data_dir) else str(path)


class OutcomeRecorder:
    """The store's bookkeeping for finished commands, and the load snapshots it keeps beside it."""

    def __init__(self, store: Store, data_dir: Path, checkpoint_root: Path, snapshot_root: Path) -> None:
        self.store = store
        self.data_dir = data_dir
        self.checkpoint_root = checkpoint_root
        self.snapshot_root = snapshot_root

    def record(self, job: Job, outcome: Outcome) -> None:
        """The store's bookkeeping for a finished command (idempotent: it may be retried). A save
        or load commits its effect on the run and the job's completion in one transaction: a
        SIGKILL between separate commits would leave, e.g., a listed checkpoint whose job says
        'its effect was not applied'."""
        command = job.command
        if outcome.error is not None:
            error = hide_paths(outcome.error, self.data_dir, self.checkpoint_root)
            self.store.mark_finished(job.id, error=error, error_category=outcome.error_category)
            if isinstance(command, CreateRun):
                self.store.mark_run_deleted(command.run_id)  # the run never came to be
        elif isinstance(command, Save):
            assert job.checkpoint is not None, "a save's job names the checkpoint it writes"
            relative = stored_path(Path(command.directory), self.data_dir)
            name = job.checkpoint.split("/")[1]
            step = outcome.result(Saved).step
            self.store.record_save(job.id, command.run_id, name, relative, step, job.lifecycle)
            if command.with_optimizer:
                self.drop_snapshots(command.run_id)  # it restores from its own save now
        elif isinstance(command, (Load, CreateRun)) and job.checkpoint is not None:
            source = command.directory if isinstance(command, Load) else command.from_checkpoint
            assert source is not None, "a create_run's job names a checkpoint only when it starts from one"
            snapshot = self._take_snapshot(command.run_id, job.id, Path(source))
            result: Loaded | RunCreated
            if isinstance(command, Load):
                result = Loaded(step=outcome.result(Loaded).step, restored_from=job.checkpoint)
            else:
                result = outcome.result(RunCreated)
            self.store.record_load(job.id, command.run_id, result.step, job.checkpoint, dump_result(result), snapshot)
            self.drop_snapshots(command.run_id, keep=job.id)
        elif isinstance(command, DeleteRun):
            self.store.mark_finished(job.id, result=dump_result(outcome.result(RunDeleted)))
            self.drop_snapshots(command.run_id)
        elif isinstance(command, OptimStep):
            self.store.record_step(job.id, command.run_id, outcome.result(OptimStepResult).model_dump())
        elif isinstance(command, ForwardBackward) and not command.forward_only:
            trained = outcome.result(ForwardBackwardResult)
            self.store.record_forward_backward(
                job.id, command.run_id, dump_result(trained), trained.loss, trained.num_tokens, _weight_sum(command)
            )
        else:
            self.store.mark_finished(job.id, result=dump_result(outcome.unwrap()))

    def _take_snapshot(self, run_id: str, job_id: str, source: Path) -> str:
        """A private copy, by hard links, of the checkpoint a run just loaded; after a restart the
        run restores from it, so it comes back as exactly what it loaded whatever happens to the
        source (overwritten by its run's next save, deleted). Hard links cost no space while the
        source exists: a save writes new files and renames them in, never rewriting old ones.
        Returns its path relative to the data directory; it counts once the store records it."""
        target = self.snapshot_root / run_id / job_id
        target.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if file.is_file() and not (target / file.name).exists():
                try:
                    os.link(file, target / file.name)
                except OSError:  # a file system without hard links: copy
                    shutil.copy2(file, target / file.name)
                    fsync(target / file.name)
        for directory in (target, target.parent, target.parent.parent):  # durable before it is recorded
            fsync(directory)
        return stored_path(target, self.data_dir)

    def drop_snapshots(self, run_id: str, keep: str | None = None) -> None:
        folder = self.snapshot_root / run_id
        for path in folder.iterdir() if folder.is_dir() else ():
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)


def _weight_sum(command: ForwardBackward) -> float | None:
    """cross_entropy's summed weights over the batch (a datum without weights weighs 1 at every
    position): its weighted loss over this is the mean NLL per token, whether the weights are
    ones or already normalised to sum to 1. None for the other losses (no weights)."""
    if command.loss_fn != "cross_entropy":
        return None
    total = 0.0
    for datum in command.data:
        weights = datum.loss_fn_inputs.weights
        total += len(datum.loss_fn_inputs.target_tokens) if weights is None else _total(weights)
    return total


def _total(values) -> float:
    return float(sum(_total(v) if isinstance(v, (list, tuple)) else v for v in values))
