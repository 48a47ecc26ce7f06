"""The server's edge in front of every route: the Host check of a keyless loopback server, and the
headers that keep the browser pages (the dashboard, the API docs) from being framed or made to
run anything but their own scripts.

Both are pure ASGI middleware (an `@app.middleware("http")` wraps every request in extra tasks
and streams: about a third of the event loop's time per small SDK round trip).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .._net import is_loopback_host

# The browser pages' policy: their own scripts and styles only (no inline script, no CDN), images
# also from data: URLs (Swagger UI's icons), calls to this origin only, never inside a frame.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_PAGE_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
# Every response, API answers included: none is meant to be framed or sniffed as another type.
_ALL_HEADERS = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff")]

# Error(path, status, message) -> an ASGI response in the shape of the path's protocol.
ErrorResponse = Callable[[str, int, str], Callable]


def host_name(header: str) -> str:
    """The name of a Host header's value, without its port: 'example.com:80' -> 'example.com',
    '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """Answers only requests whose Host header names this machine (localhost, 127.0.0.1, [::1] or
    any loopback address) or one of `allowed`: a keyless server on loopback trusts whoever can
    reach it, and a web page can reach it through DNS rebinding (its own name resolving to
    127.0.0.1), but the browser then sends that name as the Host. Jupyter refuses such requests
    the same way. A request without a Host header (HTTP/1.0, not a browser) is answered."""

    def __init__(self, app, allowed: Iterable[str], error: ErrorResponse):
        self.app, self.error = app, error
        self.allowed = {name.lower().strip("[]") for name in allowed}

    def permits(self, name: str) -> bool:
        return "*" in self.allowed or name in self.allowed or is_loopback_host(name)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = next((value for name, value in scope["headers"] if name == b"host"), None)
        if header is None or self.permits(host_name(header.decode("latin-1"))):
            return await self.app(scope, receive, send)
        shown = header.decode("latin-1")[:200]
        response = self.error(
            scope["path"],
            403,
            f"Host {shown!r} is not allowed: a server without API keys answers only localhost, "
            f"127.0.0.1 and [::1] (add names with --allowed-hosts, or give it API keys)",
        )
        return await response(scope, receive, send)


class SecurityHeaders:
    """Adds the page headers (CSP, frame and sniffing protection) to the responses of the paths
    under `page_prefixes`, and frame and sniffing protection to every other response."""

    def __init__(self, app, page_prefixes: tuple[str, ...]):
        self.app, self.page_prefixes = app, page_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        extra = _PAGE_HEADERS if path == "/" or path.startswith(self.page_prefixes) else _ALL_HEADERS

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", ())}
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), *((n, v) for n, v in extra if n not in names)],
                }
            await send(message)

        await self.app(scope, receive, send_with_headers)
