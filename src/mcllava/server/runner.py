"""Running the app with uvicorn, with the limits that keep slow or idle clients from holding connections."""

from __future__ import annotations

import asyncio
from functools import partial

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import ServerLimits


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline for each request's headers: a connection that has not sent
    a whole request head `header_timeout_s` seconds after it opened (or after its last answer) is closed, however
    slowly it trickles bytes in (uvicorn's keep-alive timer restarts at every byte)."""

    def __init__(self, *args, header_timeout_s: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head arrived
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_options(limits: ServerLimits = ServerLimits()) -> dict:
    """uvicorn's options for `limits`: request heads within `header_timeout_s`, idle connections closed after
    `keep_alive_s`, heads of at most `max_header_bytes`, at most `max_connections` open connections (a request
    beyond them gets 503). `BodyLimit` bounds the time a body may take."""
    return dict(
        http=partial(HeaderDeadlineProtocol, header_timeout_s=limits.header_timeout_s),
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        limit_concurrency=limits.max_connections,
    )


def uvicorn_config(app, limits: ServerLimits = ServerLimits(), **kwargs) -> uvicorn.Config:
    """A uvicorn configuration with `uvicorn_options` (for running the app in a thread, as tests and benchmarks do)."""
    return uvicorn.Config(app, **uvicorn_options(limits), **kwargs)


def run(app, host: str, port: int, limits: ServerLimits = ServerLimits(), log_level: str = "info") -> None:
    """Serve `app` on host:port until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(limits))
