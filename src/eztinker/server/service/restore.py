"""What a start finds after a stop or a crash: half-written checkpoints, interrupted jobs, and
every live run to rebuild on its base model from its last saved or loaded checkpoint."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ...backend import InvalidInput
from ...backend.commands import CreateRun
from ...backend.results import RunCreated
from ...types import parse_checkpoint_ref
from ..records import RunRecord
from ..runner import stored_path
from .checkpoints import CheckpointsPart

log = logging.getLogger(__name__)


class RestorePart(CheckpointsPart):
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
        for run in self.store.live_runs():
            self._restore_run(run)

    def _restore_lost_run(self, run_id: str) -> None:
        """A run whose worker was lost comes back as after a restart, unless deleted meanwhile or
        still being created (its create job fails with the loss, and it never comes to be)."""
        run = self.store.run(run_id)
        if run is not None and run_id not in self.store.unfinished_creates():
            self._restore_run(run)

    def _restore_run(self, run: RunRecord) -> None:
        run_id, model = run.id, run.base_model
        if model not in self.models:
            log.error(
                "run %s is on base model %s, which this server does not hold (it holds %s); it stays "
                "listed and comes back when a server with that model starts",
                run_id,
                model,
                self._held(),
            )
            return
        ref, directory = run.resume_from, None
        if ref is None and run.step:
            log.warning("run %s was never saved; its adapter restarts from step 0", run_id)
        if run.resume_path is not None:  # its snapshot of what it loaded, not the source
            directory = str(self.data_dir / run.resume_path)
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
            lora=run.lora,
            seed=run.seed,
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
        keep = {run.resume_path for run in self.store.live_runs() if run.resume_path}
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
