"""Signed checkpoint downloads: URLs this server hands out (Tinker's archive URL and external
weights URLs) and serves itself, usable without a key until they expire.

A URL names one user's right to read one checkpoint, or one file of it: at download time the
checkpoint must still exist, be unexpired, and be that user's or published. Files of an export
saved with age recipients are encrypted to them as they go out (`<file>.age`).
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from .archive import ADAPTER_FILES, adapter_archive
from .service import Service, ServiceError, invalid

PATH = "/downloads/{token}"
AGE_SUFFIX = ".age"


def download_url(service: Service, request: Request, user: str, ref: str, file: str | None = None) -> tuple[str, float]:
    """A signed URL for checkpoint `ref` ('<run_id>/<name>', already readable by `user`): its
    adapter as a tar, or one `file` of it; and when it expires (a Unix time)."""
    expires = time.time() + service.settings.download_url_seconds
    token = service.signer.sign({"user": user, "ref": ref, "file": file}, expires)
    return str(request.url_for("signed_download", token=token)), expires


def external_files(service: Service, ref: str) -> list[str]:
    """The files of an external weights checkpoint as its URLs name them (encrypted: '.age')."""
    suffix = AGE_SUFFIX if service.checkpoint_meta(ref).get("age_recipients") else ""
    return [f + suffix for f in ADAPTER_FILES]


def check_age_recipients(recipients: list[str]) -> list[str]:
    """Refuse what is not an age or SSH public key (before anything is saved)."""
    if not 1 <= len(recipients) <= 10:
        raise invalid(("age_encryption_recipients",), "give between 1 and 10 recipients")
    for i, text in enumerate(recipients):
        _recipient(text, ("age_encryption_recipients", i))
    return recipients


def _recipient(text: str, loc: tuple):
    try:
        import pyrage
    except ImportError:  # pragma: no cover - pyrage comes with the tinker extra
        raise invalid(loc, "age encryption needs the pyrage package on the server: pip install pyrage") from None
    for kind in (pyrage.x25519.Recipient, pyrage.ssh.Recipient):
        try:
            return kind.from_str(text)
        except Exception:
            continue
    raise invalid(loc, f"{text[:40]!r} is neither an age ('age1...') nor an SSH public key")


def downloads_router(service: Service) -> APIRouter:
    router = APIRouter()

    @router.get(PATH, name="signed_download", include_in_schema=False)
    def signed_download(token: str) -> Response:
        try:
            grant = service.signer.verify(token)
        except ValueError as exc:
            raise ServiceError(403, str(exc)) from None
        # Checked again now: deleted, expired or unpublished since the URL was made is a 404.
        directory, ref = service.checkpoint_path(grant["user"], grant["ref"], published=True)
        file = grant.get("file")
        if file is None:
            return adapter_archive(directory, ref)
        plain = file.removesuffix(AGE_SUFFIX)
        if file not in external_files(service, ref) or not (directory / plain).is_file():
            raise ServiceError(404, f"checkpoint {ref} has no file {file!r}")
        if file == plain:
            return FileResponse(directory / plain, media_type="application/octet-stream", filename=plain)
        return Response(_encrypted(service, ref, directory / plain), media_type="application/octet-stream")

    return router


def _encrypted(service: Service, ref: str, path: Path) -> bytes:
    import pyrage

    recipients = service.checkpoint_meta(ref)["age_recipients"]
    return pyrage.encrypt(path.read_bytes(), [_recipient(text, ("age_encryption_recipients",)) for text in recipients])
