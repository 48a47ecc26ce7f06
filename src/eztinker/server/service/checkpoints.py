"""Checkpoints: saving and loading a run's state, finding a checkpoint a user may read, its
lifetime (expiry, the sweep, pruning the server's own snapshots) and its visibility."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from ...backend import CheckpointState, InvalidInput
from ...backend.commands import Load, Save
from ...backend.results import JobKind
from ...types import CheckpointInfo, JobRef, LoadRequest, SaveRequest, parse_checkpoint_ref
from .. import checkpoints as names
from ..checkpoints import MAX_TTL_SECONDS, CheckpointKind, link_copy
from ..records import CheckpointLifecycle, new_id
from ..runner import Job, stored_path
from .core import ServiceCore
from .errors import LimitExceeded, ServiceError, invalid, not_found

log = logging.getLogger(__name__)


class CheckpointsPart(ServiceCore):
    _sweeping: threading.Event

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
            queued = sum(1 for job in self.store.unfinished_jobs(user) if job.kind is JobKind.save)
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

    def checkpoint_path(
        self, user: str, ref: str, field: str = "checkpoint", *, published: bool = False
    ) -> tuple[Path, str]:
        """The directory of checkpoint '<run_id>/<name>' the user owns (404 otherwise); with
        `published`, also another user's that its owner published (to load, sample or download)."""
        return self._checkpoint(user, ref, default_run=None, field=field, published=published)

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
        if checkpoint is not None and checkpoint.expired(time.time()):
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

    def user_checkpoints(self, user: str) -> list[CheckpointInfo]:
        """Every checkpoint of the user's live runs but the server's own unnamed snapshots, oldest
        first (expired ones included until the sweep deletes them)."""
        return [c.info() for c in self.store.checkpoints_of(user)]

    def checkpoint_meta(self, ref: str) -> dict[str, Any]:
        """What the protocol stored with checkpoint '<run_id>/<name>' ({} for none), which the
        caller has already found readable."""
        run_id, name = ref.split("/", 1)
        checkpoint = self.store.checkpoint(run_id, name)
        return {} if checkpoint is None else checkpoint.meta

    def checkpoint_state(self, path: Path, field: str) -> CheckpointState:
        """What a checkpoint directory holds (base model, LoRA, step), read without loading it;
        422 on `field` when it cannot be read."""
        try:
            return self.backend.read_checkpoint(path)
        except InvalidInput as exc:
            raise invalid((field,), exc.message) from None

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
                "expired" if self.store.run(checkpoint.run_id) else "its run was deleted",
            )
            self._remove_checkpoint(checkpoint.run_id, checkpoint.name)
        for run_id in {c.run_id for c in doomed}:
            if self.store.run(run_id) is None:
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
        for run in self.store.runs_resuming_from(checkpoint.ref):
            if path.is_dir():
                copy = self.snapshot_root / run.id / new_id("keep")
                link_copy(path, copy)
                self.store.set_resume_path(run.id, stored_path(copy, self.data_dir))
        self.store.delete_checkpoint(run_id, name)  # unlisted first: a crash then leaves only a stray folder
        if path.is_relative_to(self.checkpoint_root):
            shutil.rmtree(path, ignore_errors=True)

    def _remove_checkpoints_of(self, run_id: str) -> None:
        for checkpoint in self.store.checkpoints(run_id):
            self._remove_checkpoint(checkpoint.run_id, checkpoint.name)
        _remove_empty(self.checkpoint_root / run_id)


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
