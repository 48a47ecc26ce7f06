"""The SDK's exceptions: each says what went wrong and, where it can, what to do."""

from __future__ import annotations

import httpx


class EZTinkerError(Exception):
    """Base class of every error the SDK raises."""


class ConnectionFailedError(EZTinkerError):
    def __init__(self, base_url: str, cause: Exception):
        super().__init__(
            f"cannot reach the EZTinker server at {base_url} ({type(cause).__name__}: {cause}). "
            f"Is `eztinker server` running there? Start it with: eztinker server --model smollm2-135m"
        )
        self.base_url = base_url


class APIStatusError(EZTinkerError):
    """The server refused the request (4xx) or kept failing (5xx)."""

    def __init__(self, status_code: int, detail, message: str):
        super().__init__(message)
        self.status_code, self.detail = status_code, detail

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIStatusError:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if isinstance(detail, list):  # validation errors: name each field
            parts = [
                f"{'.'.join(str(p) for p in item.get('loc', [])[1:]) or 'body'}: {item.get('msg')}"
                for item in detail
                if isinstance(item, dict)
            ]
            text = "; ".join(parts) or str(detail)
        else:
            text = str(detail)
        return cls(
            response.status_code, detail, f"HTTP {response.status_code} from {response.request.url.path}: {text}"
        )


class JobFailedError(EZTinkerError):
    def __init__(self, job_id: str, kind: str, error: str):
        super().__init__(f"{kind} job {job_id} failed: {error}")
        self.job_id, self.kind, self.error = job_id, kind, error
