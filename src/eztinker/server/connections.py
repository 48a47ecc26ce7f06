"""Bounds on slow clients, below the ASGI app (which sees a request only once its headers are in).

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and answers 503 beyond
`limit_concurrency`, but it never times out a client that is *sending*: a connection that sends a
header byte now and then, or headers and then half a body, stays open forever (slowloris). This
protocol gives each request a deadline for its headers and one for its body.
"""

from __future__ import annotations

import asyncio
import functools

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMED_OUT_BODY = b"the request took too long to send\n"
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMED_OUT_BODY), _TIMED_OUT_BODY)
)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines: a request's headers must be complete within
    `header_timeout` seconds of the connection opening (or of the previous response), and its
    body within `body_timeout` seconds of its headers; else it gets a 408 and the connection is
    closed. Waiting for the app (a long-poll) has no deadline here."""

    def __init__(self, *args, header_timeout: float, body_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._timeouts = {"headers": header_timeout, "body": body_timeout}
        self._waiting_for: str | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._wait_for("headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._wait_for(None)
        super().connection_lost(exc)

    def _follow_request(self) -> None:
        state = self.conn.their_state
        self._wait_for("headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None)

    def _wait_for(self, part: str | None) -> None:
        if part == self._waiting_for:
            return  # the deadline runs from when the wait began, not from the last byte
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting_for = part
        if part is not None:
            self._deadline = self.loop.call_later(self._timeouts[part], self._time_out)

    def _time_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # no response has started: say why
            self.transport.write(_TIMED_OUT)
        self.transport.close()


def uvicorn_options(settings) -> dict:
    """Keyword arguments for uvicorn.run / uvicorn.Config that enforce the settings' bounds."""
    return {
        # Requests still open this long after SIGTERM are cut (their jobs have had the grace period).
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds + 5,
        "http": functools.partial(
            TimedH11Protocol, header_timeout=settings.header_timeout_seconds, body_timeout=settings.body_timeout_seconds
        ),
        # uvicorn refuses once `connections >= limit`, counting the connection asking.
        "limit_concurrency": settings.max_connections + 1,
    }


def draining_server(config, runner):
    """A uvicorn Server whose first SIGTERM (or Ctrl-C) also drains the runner at once: no job
    starts any more, queued ones fail as interrupted (their long-polls answer now), running ones
    finish within shutdown_grace_seconds (the app's shutdown waits for them). Without it the
    runner would go on starting queued jobs while uvicorn waits for open requests to end."""
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                # Not in the signal handler itself: it interrupts the loop's thread, which may hold the runner's lock.
                threading.Thread(target=runner.drain, name="eztinker-drain", daemon=True).start()
            super().handle_exit(sig, frame)

    return DrainingServer(config)
