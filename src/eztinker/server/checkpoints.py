"""Checkpoint names, and the signed URLs that let a download go without a key.

One namespace per run, split by prefix so that no two APIs can write the same checkpoint:
  - `<name>`: a training checkpoint (REST `save`, Tinker `save_state`); these names may not
    start with a reserved prefix below,
  - `sampler_weights.<name>`: Tinker `save_weights_for_sampler(name)`,
  - `sampler_weights._<sampler>`: an unnamed snapshot the server saved for a sampling session
    (a user's name starts with a letter or digit, so no user name is one of these),
  - `external_weights.<name>`: Tinker `save_weights_external(name)`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
from enum import Enum
from pathlib import Path

SAMPLER_PREFIX = "sampler_weights."
EXTERNAL_PREFIX = "external_weights."
_AUTO_PREFIX = SAMPLER_PREFIX + "_"
RESERVED_PREFIXES = (SAMPLER_PREFIX, EXTERNAL_PREFIX)
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600  # Tinker's own bound: ten years


class CheckpointKind(str, Enum):
    training = "training"  # adapter + optimizer state + step: resumable
    sampler = "sampler"  # adapter + step, for sampling
    external = "external"  # adapter + step, for download (a PEFT folder)


_PREFIX = {CheckpointKind.sampler: SAMPLER_PREFIX, CheckpointKind.external: EXTERNAL_PREFIX}


def kind_of(name: str) -> CheckpointKind:
    """The kind of a stored checkpoint name."""
    if name.startswith(SAMPLER_PREFIX):
        return CheckpointKind.sampler
    if name.startswith(EXTERNAL_PREFIX):
        return CheckpointKind.external
    return CheckpointKind.training


def stored_name(kind: CheckpointKind, name: str) -> str:
    """A user's `name` for a checkpoint of `kind`, as stored; ValueError when a training
    checkpoint's name would fall into another kind's namespace."""
    if kind is CheckpointKind.training:
        if name.startswith(RESERVED_PREFIXES):
            raise ValueError(
                f"checkpoint name {name!r} starts with a reserved prefix "
                f"({', '.join(repr(p) for p in RESERVED_PREFIXES)}): choose another name"
            )
        return name
    return _PREFIX[kind] + name


def user_name(name: str) -> str:
    """A stored name without its kind's prefix."""
    prefix = _PREFIX.get(kind_of(name))
    return name[len(prefix) :] if prefix else name


def auto_snapshot_name(sampler_id: str) -> str:
    """The stored name of the unnamed snapshot a sampling session samples from."""
    return _AUTO_PREFIX + sampler_id.replace(":", "-")


def with_optimizer(kind: CheckpointKind) -> bool:
    return kind is CheckpointKind.training


def link_copy(source: Path, target: Path) -> None:
    """`target`: a copy of checkpoint folder `source` made of hard links (no disk space while
    the source exists; a save never rewrites a file in place), copies where links fail."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not (target / file.name).exists():
            try:
                os.link(file, target / file.name)
            except OSError:
                shutil.copy2(file, target / file.name)


class UrlSigner:
    """Signs download URLs (HMAC-SHA256 with a key kept in the data directory, so that URLs
    outlive a restart): a token names what it opens and until when, and needs no API key."""

    def __init__(self, key_file: Path):
        if key_file.exists():
            self._key = key_file.read_bytes()
        else:
            key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(32))
            self._key = key_file.read_bytes()

    def sign(self, subject: dict, expires_at: float) -> str:
        payload = _b64(json.dumps({**subject, "exp": int(expires_at)}, separators=(",", ":")).encode())
        return f"{payload}.{_b64(self._mac(payload))}"

    def verify(self, token: str) -> dict:
        """The token's subject; ValueError when it is forged, malformed or expired."""
        payload, _, mac = token.partition(".")
        try:
            genuine = hmac.compare_digest(base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4)), self._mac(payload))
            subject = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))) if genuine else None
        except ValueError:
            subject = None
        if not isinstance(subject, dict) or not isinstance(subject.get("exp"), int):
            raise ValueError("this download link is not valid")
        if subject["exp"] < time.time():
            raise ValueError("this download link has expired: ask for a new one")
        return subject

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
