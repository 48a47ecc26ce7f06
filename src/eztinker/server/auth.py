"""API keys -> users, shared by every protocol's routes.

A key arrives as `Authorization: Bearer <key>` (EZTinker's SDK) or `X-API-Key: <key>` (the Tinker
SDK); both map through the same table. With no keys configured (loopback only) every request is
user "default".
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from .service import ServiceError


def authenticate(keys: dict[str, str], given: str) -> str | None:
    """The user `given` belongs to, or None. Compared against every key: constant time."""
    user = None
    for key, name in keys.items():
        if hmac.compare_digest(key.encode(), given.encode()):
            user = name
    return user


def current_user(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(alias="X-API-Key", include_in_schema=False)] = None,
) -> str:
    keys: dict[str, str] = request.app.state.user_keys
    if not keys:
        return "default"
    # The auth scheme is case-insensitive (RFC 7235), so "bearer <key>" is accepted too.
    given = x_api_key or (authorization[7:] if authorization and authorization[:7].lower() == "bearer " else "")
    user = authenticate(keys, given)
    if user is None:
        raise ServiceError(401, "missing or wrong API key (send 'Authorization: Bearer <key>' or 'X-API-Key: <key>')")
    return user


User = Annotated[str, Depends(current_user)]
