"""`TinkerServing`'s part for the SDK's RestClient: training runs and their checkpoints listed,
a checkpoint deleted, a checkpoint's weights described."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from ...types import CheckpointInfo, RunInfo
from ..service import ServiceError
from . import protocol as p
from .core import ATTN_MODULES, MLP_MODULES, TinkerCore


class RunsPart(TinkerCore):
    """RestClient's training runs and checkpoints: listings, deletion, a checkpoint's weights info."""

    def _checkpoint_json(self, run_id: str, info: CheckpointInfo) -> dict:
        checkpoint, kind = p.checkpoint_id(info.name)
        metadata = self.service.checkpoint_meta(f"{run_id}/{info.name}").get("user_metadata")
        return {
            "checkpoint_id": checkpoint,
            "checkpoint_type": kind,
            "time": info.created_at.isoformat(),
            "tinker_path": p.tinker_path(run_id, info.name),
            "public": info.public,
            "size_bytes": _size(self.service.data_dir / info.path),
            "user_metadata": metadata,
            "expires_at": None if info.expires_at is None else info.expires_at.isoformat(),
        }

    def _training_run_json(self, run: RunInfo) -> dict:
        record = self.service.run_record(run.id)
        training = [c for c in _unexpired(run.checkpoints) if p.checkpoint_id(c.name)[1] == "training"]
        sampler = [c for c in _unexpired(run.checkpoints) if p.checkpoint_id(c.name)[1] == "sampler"]
        metadata = record.metadata.get("user_metadata") or {}
        return {
            "training_run_id": run.id,
            "base_model": run.base_model,
            "model_owner": record.owner,
            "is_lora": True,
            "corrupted": False,
            "lora_rank": run.lora.rank,
            "last_request_time": run.created_at.isoformat(),
            "last_checkpoint": self._checkpoint_json(run.id, training[-1]) if training else None,
            "last_sampler_checkpoint": self._checkpoint_json(run.id, sampler[-1]) if sampler else None,
            "user_metadata": {k: str(v) for k, v in metadata.items()},
        }

    def training_runs(self, user: str, limit: int, offset: int) -> dict:
        runs = self.service.list_runs(user)
        page = runs[offset : offset + limit]
        return {
            "training_runs": [self._training_run_json(r) for r in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
        }

    def training_run(self, user: str, run_id: str) -> dict:
        return self._training_run_json(self.service.get_run(user, run_id))

    def run_checkpoints(self, user: str, run_id: str) -> dict:
        run = self.service.get_run(user, run_id)
        return {"checkpoints": [self._checkpoint_json(run_id, c) for c in _unexpired(run.checkpoints)]}

    def user_checkpoints(self, user: str, limit: int, offset: int) -> dict:
        every = _unexpired(self.service.user_checkpoints(user))
        return {
            "checkpoints": [self._checkpoint_json(c.run_id, c) for c in every[offset : offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(every)},
        }

    def our_checkpoint(self, user: str, run_id: str, checkpoint: str) -> tuple[str, Path]:
        """Tinker's checkpoint id of one of the user's runs -> (our name, its folder)."""
        try:
            name = p.from_checkpoint_id(checkpoint)
        except ValueError as exc:
            raise ServiceError(422, str(exc), ("checkpoint_id",)) from None
        path, _ = self.service.checkpoint_path(user, f"{run_id}/{name}")
        return name, path

    def delete_checkpoint(self, user: str, run_id: str, checkpoint: str) -> None:
        name, _ = self.our_checkpoint(user, run_id, checkpoint)
        self.service.delete_checkpoint(user, run_id, name)

    def weights_info(self, user: str, tinker_path: str) -> dict:
        try:
            run_id, name = p.parse_tinker_path(tinker_path)
        except ValueError as exc:
            raise ServiceError(422, str(exc), ("tinker_path",)) from None
        path, _ = self.service.checkpoint_path(user, f"{run_id}/{name}", field="tinker_path", published=True)
        state = self.service.checkpoint_state(path, "tinker_path")
        targets = state.lora.target_modules
        return {
            "base_model": state.base_model,
            "optimizer_config": p.ADAMW,
            "is_lora": True,
            "lora_rank": state.lora.rank,
            "train_attn": targets == "all-linear" or any(t in targets for t in ATTN_MODULES),
            "train_mlp": targets == "all-linear" or any(t in targets for t in MLP_MODULES),
            "train_unembed": state.lora.train_unembed,
        }


def _unexpired(checkpoints: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """Expired checkpoints leave listings at once, before the sweep deletes them."""
    now = datetime.now(timezone.utc)
    return [c for c in checkpoints if c.expires_at is None or c.expires_at > now]


def _size(path: Path) -> int | None:
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    except OSError:
        return None
