"""What the service refuses, in a shape each router maps to its own protocol's errors."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service refuses: an HTTP-like status, a message, and (for 422) the offending
    field's location within the request body. Each router maps it to its protocol's shape."""

    def __init__(self, status: int, message: str, loc: tuple | None = None):
        super().__init__(message)
        self.status, self.message, self.loc = status, message, loc


class LimitExceeded(ServiceError):
    """A per-user limit refused the request (429). `clears`: whether waiting for the user's work
    in flight can make room; if not, retrying is pointless (the user must delete something or ask
    for less), and each protocol says so in its own way."""

    def __init__(self, limit: str, message: str, *, clears: bool):
        super().__init__(429, message)
        self.limit, self.clears = limit, clears


def not_found(what: str) -> ServiceError:
    return ServiceError(404, f"{what} not found")


def invalid(loc: tuple, message: str) -> ServiceError:
    return ServiceError(422, message, loc)
