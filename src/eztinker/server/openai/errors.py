"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, and the service's
refusals in its terms."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..service import ServiceError


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers: dict[str, str] = {}


def error_content(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    # OpenAI's own 429s are {"type": "requests" | "tokens", "code": "rate_limit_exceeded"}.
    kind = "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
    if code is None:
        code = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_content(status, message, param, code))


# The service's field names where OpenAI's differ (or are the same: listed so they are not guessed).
_PARAMS = {
    "num_samples": "n",
    "max_tokens": "max_tokens",
    "seed": "seed",
    "stop": "stop",
    "temperature": "temperature",
    "top_p": "top_p",
}


def from_service_error(exc: ServiceError, names: dict[str, str] | None = None) -> OpenAIError:
    """The service's refusal in OpenAI's terms: its 422s are 400s naming the OpenAI parameter."""
    status = 400 if exc.status == 422 else exc.status
    param = None
    if exc.loc:
        key = str(exc.loc[1]) if exc.loc[0] == "sampling_params" and len(exc.loc) > 1 else str(exc.loc[0])
        param = (names or {}).get(key, _PARAMS.get(key, key))
    error = OpenAIError(status, exc.message, param)
    clears = getattr(exc, "clears", None)  # a per-user limit (service.LimitExceeded)
    if clears is not None:
        error.headers = {"Retry-After": "1"} if clears else {"X-Should-Retry": "false"}
    return error
