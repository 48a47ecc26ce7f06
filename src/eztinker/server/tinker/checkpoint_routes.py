"""The Tinker RestClient's checkpoint routes: training runs and their checkpoints listed, deleted,
published, given a TTL, downloaded (archive URL, external weights URLs) and described.

Every route answers for the caller's own checkpoints; a published one of another user can also be
downloaded and described (loading and sampling it are the training and sampling routes').
"""

from __future__ import annotations

import email.utils
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from ...types import CheckpointInfo
from ..auth import User
from ..checkpoints import CheckpointKind, kind_of
from ..downloads import download_url, external_files
from ..service import Service, ServiceError, invalid
from . import protocol as p


def checkpoint_router(service: Service) -> APIRouter:
    router = APIRouter()

    def checkpoint_json(run_id: str, info: CheckpointInfo) -> dict:
        checkpoint, kind = p.checkpoint_id(info.name)
        metadata = service.store.checkpoint_meta(run_id, info.name).get("user_metadata")
        return {"checkpoint_id": checkpoint, "checkpoint_type": kind, "time": info.created_at.isoformat(),
                "tinker_path": p.tinker_path(run_id, info.name), "public": info.public,
                "size_bytes": _size(service.data_dir / info.path), "user_metadata": metadata,
                "expires_at": None if info.expires_at is None else info.expires_at.isoformat()}

    def training_run_json(run) -> dict:
        row = service.store.run_row_any(run.id)
        checkpoints = _unexpired(run.checkpoints)
        training = [c for c in checkpoints if kind_of(c.name) is CheckpointKind.training]
        sampler = [c for c in checkpoints if kind_of(c.name) is CheckpointKind.sampler]
        metadata = _json_or_empty(row["metadata"]).get("user_metadata") or {}
        return {"training_run_id": run.id, "base_model": run.base_model, "model_owner": row["owner"], "is_lora": True,
                "corrupted": False, "lora_rank": run.lora.rank, "last_request_time": run.created_at.isoformat(),
                "last_checkpoint": checkpoint_json(run.id, training[-1]) if training else None,
                "last_sampler_checkpoint": checkpoint_json(run.id, sampler[-1]) if sampler else None,
                "user_metadata": {k: str(v) for k, v in metadata.items()}}

    @router.get("/training_runs")
    def list_training_runs(user: User, limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                           offset: Annotated[int, Query(ge=0)] = 0) -> dict:
        runs = service.list_runs(user)
        page = runs[offset: offset + limit]
        return {"training_runs": [training_run_json(r) for r in page],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    @router.get("/training_runs/{run_id}")
    def get_training_run(run_id: str, user: User) -> dict:
        return training_run_json(service.get_run(user, run_id))

    @router.get("/training_runs/{run_id}/checkpoints")
    def list_checkpoints(run_id: str, user: User) -> dict:
        run = service.get_run(user, run_id)
        return {"checkpoints": [checkpoint_json(run_id, c) for c in _unexpired(run.checkpoints)]}

    @router.get("/checkpoints")
    def list_user_checkpoints(user: User, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                              offset: Annotated[int, Query(ge=0)] = 0) -> dict:
        every = _unexpired(service.store.checkpoints_of(user))
        return {"checkpoints": [checkpoint_json(c.run_id, c) for c in every[offset: offset + limit]],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(every)}}

    def checkpoint_name(checkpoint: str) -> str:
        try:
            return p.from_checkpoint_id(checkpoint)
        except ValueError as exc:
            raise invalid(("checkpoint_id",), str(exc)) from None

    def readable(user: str, run_id: str, checkpoint: str) -> tuple[str, Path, str]:
        """(our name, its folder, its reference) of a checkpoint the user may read."""
        name = checkpoint_name(checkpoint)
        path, ref = service.checkpoint_path(user, f"{run_id}/{name}", published=True)
        return name, path, ref

    # The routes below end in a fixed word: registered before the bare DELETE, whose {checkpoint:path}
    # would take 'weights/x/publish' whole.
    @router.get("/training_runs/{run_id}/checkpoints/{checkpoint:path}/archive")
    def checkpoint_archive(run_id: str, checkpoint: str, user: User, request: Request) -> Response:
        """A signed URL of the checkpoint's PEFT adapter as a tar: JSON `{url, expires}` for a
        client that accepts JSON (the SDKs 0.25-0.34 ask so), else a 302 to it."""
        _, _, ref = readable(user, run_id, checkpoint)
        url, expires = download_url(service, request, user, ref)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"url": url, "expires": _iso(expires)})
        return RedirectResponse(url, status_code=302, headers={"Expires": email.utils.formatdate(expires, usegmt=True)})

    @router.get("/training_runs/{run_id}/checkpoints/{checkpoint:path}/external_weights_urls")
    def external_weights_urls(run_id: str, checkpoint: str, user: User, request: Request) -> dict:
        """One signed URL per file of an external weights checkpoint (a PEFT adapter folder)."""
        name, _, ref = readable(user, run_id, checkpoint)
        if kind_of(name) is not CheckpointKind.external:
            raise invalid(("checkpoint_id",), f"{checkpoint} is not an external weights checkpoint "
                                              "(save one with save_weights_external)")
        urls, expires = {}, 0.0
        for file in external_files(service, ref):
            urls[file], expires = download_url(service, request, user, ref, file)
        return {"urls": urls, "expires": _iso(expires)}

    @router.post("/training_runs/{run_id}/checkpoints/{checkpoint:path}/publish")
    def publish(run_id: str, checkpoint: str, user: User) -> Response:
        service.publish_checkpoint(user, run_id, checkpoint_name(checkpoint), True)
        return Response(status_code=204)

    @router.delete("/training_runs/{run_id}/checkpoints/{checkpoint:path}/publish")
    def unpublish(run_id: str, checkpoint: str, user: User) -> Response:
        service.publish_checkpoint(user, run_id, checkpoint_name(checkpoint), False)
        return Response(status_code=204)

    @router.put("/training_runs/{run_id}/checkpoints/{checkpoint:path}/ttl")
    def set_ttl(run_id: str, checkpoint: str, body: p.CheckpointTtl, user: User) -> Response:
        service.set_checkpoint_ttl(user, run_id, checkpoint_name(checkpoint), body.ttl_seconds)
        return Response(status_code=204)

    @router.delete("/training_runs/{run_id}/checkpoints/{checkpoint:path}")
    def delete_checkpoint(run_id: str, checkpoint: str, user: User) -> dict:
        service.delete_checkpoint(user, run_id, checkpoint_name(checkpoint))
        return {}

    @router.post("/weights_info")
    def weights_info(body: p.WeightsInfo, user: User) -> dict:
        try:
            run_id, name = p.parse_tinker_path(body.tinker_path)
        except ValueError as exc:
            raise ServiceError(422, str(exc), ("tinker_path",)) from None
        path, _ = service.checkpoint_path(user, f"{run_id}/{name}", field="tinker_path", published=True)
        state = service.backend.read_checkpoint(path)
        mlp = state.lora.target_modules == "all-linear" or "up_proj" in state.lora.target_modules
        return {"base_model": state.base_model, "is_lora": True, "lora_rank": state.lora.rank,
                "train_attn": True, "train_mlp": mlp, "train_unembed": False}

    return router


def _unexpired(checkpoints: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """Expired checkpoints are gone from listings at once, before the sweep deletes them."""
    now = datetime.now(timezone.utc)
    return [c for c in checkpoints if c.expires_at is None or c.expires_at > now]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


def _size(path: Path) -> int | None:
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    except OSError:
        return None


def _json_or_empty(text: str | None) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}
