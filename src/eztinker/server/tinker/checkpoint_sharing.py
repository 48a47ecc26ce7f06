"""The Tinker RestClient's checkpoint lifecycle: publishing, TTLs, and downloads through signed
URLs (the archive URL of SDKs 0.25-0.34, the external weights URLs of 0.38 and the cookbook).

Owners publish, unpublish and set TTLs; a published checkpoint of another user can be downloaded
too (loading and sampling it are TinkerServing's). The URLs are this server's own (downloads.py).
"""

from __future__ import annotations

import email.utils
from datetime import datetime, timezone

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from ..checkpoints import CheckpointKind, kind_of
from ..downloads import download_url, external_files
from ..service import Service, invalid
from . import protocol as p


class CheckpointSharing:
    """Publish, TTL and download of Tinker checkpoints ('<kind>/<name>' ids of a run)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def _name(self, checkpoint: str) -> str:
        try:
            return p.from_checkpoint_id(checkpoint)
        except ValueError as exc:
            raise invalid(("checkpoint_id",), str(exc)) from None

    def _readable(self, user: str, run_id: str, checkpoint: str) -> tuple[str, str]:
        """(our name, '<run_id>/<name>') of a checkpoint the user owns or that is published."""
        name = self._name(checkpoint)
        _, ref = self.service.checkpoint_path(user, f"{run_id}/{name}", published=True)
        return name, ref

    def publish(self, user: str, run_id: str, checkpoint: str, public: bool) -> None:
        self.service.publish_checkpoint(user, run_id, self._name(checkpoint), public)

    def set_ttl(self, user: str, run_id: str, checkpoint: str, ttl_seconds: int | None) -> None:
        self.service.set_checkpoint_ttl(user, run_id, self._name(checkpoint), ttl_seconds)

    def archive_url(self, user: str, run_id: str, checkpoint: str, request: Request) -> Response:
        """A signed URL of the checkpoint's PEFT adapter as a tar: JSON `{url, expires}` for a
        client that accepts JSON (SDKs 0.25-0.34 ask so), else a 302 to it with an Expires header."""
        _, ref = self._readable(user, run_id, checkpoint)
        url, expires = download_url(self.service, request, user, ref)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"url": url, "expires": _iso(expires)})
        return RedirectResponse(url, status_code=302, headers={"Expires": email.utils.formatdate(expires, usegmt=True)})

    def external_weights_urls(self, user: str, run_id: str, checkpoint: str, request: Request) -> dict:
        """One signed URL per file of an external weights checkpoint (a PEFT adapter folder)."""
        name, ref = self._readable(user, run_id, checkpoint)
        if kind_of(name) is not CheckpointKind.external:
            raise invalid(
                ("checkpoint_id",),
                f"{checkpoint} is not an external weights checkpoint (save one with save_weights_external)",
            )
        urls, expires = {}, 0.0
        for file in external_files(self.service, ref):
            urls[file], expires = download_url(self.service, request, user, ref, file)
        return {"urls": urls, "expires": _iso(expires)}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()
