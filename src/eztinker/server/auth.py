"""API keys -> users, shared by every protocol's routes.

A key arrives as `Authorization: Bearer <key>` (EZTinker's SDK) or `X-API-Key: <key>` (the Tinker
SDK); both map through the same table, and a request carrying two different keys (in one header
twice, or one in each) is refused. With no keys configured (loopback only) every request is user
"default".
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from .service import ServiceError


def authenticate(keys: dict[str, str], given: str) -> str | None:
    """The user `given` belongs to, or None. Compared against every key: constant time."""
    user = None
    for key, name in keys.items():
        if hmac.compare_digest(key.encode(), given.encode()):
            user = name
    return user


def request_user(request: Request) -> str | None:
    """The user the request's key belongs to ("default" with no keys configured), or None: no
    key, a wrong one, or two different ones."""
    keys: dict[str, str] = request.app.state.user_keys
    if not keys:
        return "default"
    # The auth scheme is case-insensitive (RFC 7235), so "bearer <key>" is accepted too. FastAPI's
    # Header() gives only the first of repeated headers: every copy is read, so that a second key
    # (added by a proxy, or smuggled in) is refused instead of silently losing to the first.
    given = {value[7:] if value[:7].lower() == "bearer " else "" for value in request.headers.getlist("authorization")}
    given |= set(request.headers.getlist("x-api-key"))
    given.discard("")
    if len(given) != 1:
        return None  # none, or two different keys: refuse rather than guess which one is meant
    return authenticate(keys, given.pop())


def current_user(user: Annotated[str | None, Depends(request_user)]) -> str:
    if user is None:
        raise ServiceError(
            401,
            "missing or wrong API key (send 'Authorization: Bearer <key>' or 'X-API-Key: <key>', "
            "not two different keys)",
        )
    return user


User = Annotated[str, Depends(current_user)]
MaybeUser = Annotated[str | None, Depends(request_user)]
