"""Bounds on HTTP connections: how many, how long to send a request's headers, how long idle.

aiohttp reads request headers with no deadline of its own: a client that sends half a
request line and then nothing keeps its connection (and a file descriptor) until its
keep-alive timer fires, an hour by default. Nor does it cap the number of connections, so
slow clients could take the descriptors the scanner's probes need. Go servers answer the
first with `ReadHeaderTimeout` and the second with a limiting listener; this module does
the same for aiohttp, in the hooks its low-level `web.Server` offers:

* `connection_made` (called by every connection once it is established, after the TLS
  handshake) counts the connection. Past `max_connections` the new one is answered
  `503 Service Unavailable` and closed: after the client has read the answer (or a second
  at most) for up to `refusal_slots` refused connections at a time, at once beyond that.
  So the HTTP side never holds more than `max_connections + refusal_slots` descriptors
  (plus the one being turned away), which is what `exporter.scanner.limits` sets aside.
* It also starts a timer of `header_timeout` seconds. The server's request factory, which
  aiohttp calls as soon as a request's headers are parsed (or found malformed), cancels it;
  if it fires first the connection is closed, whatever it has sent so far.
* Later requests on a kept-alive connection are bounded by aiohttp's `keepalive_timeout`
  (`idle_timeout` here): it closes a connection whose next request's headers have not all
  arrived when the connection has been idle that long.

TLS handshakes happen before `connection_made` and are bounded by the event loop's
handshake timeout (60 s), not by this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from exporter.scanner.limits import HTTP_CONNECTIONS, HTTP_REFUSALS

__all__ = [
    "HEADER_TIMEOUT_SECONDS",
    "IDLE_TIMEOUT_SECONDS",
    "MAX_CONNECTIONS",
    "BoundedAppRunner",
    "BoundedServer",
]

# As exporter-toolkit users commonly set Go's ReadHeaderTimeout.
HEADER_TIMEOUT_SECONDS = 10.0
# Longer than the usual scrape intervals (up to 1 m), so Prometheus reuses its connection.
IDLE_TIMEOUT_SECONDS = 120.0
MAX_CONNECTIONS = HTTP_CONNECTIONS
# Refused connections that linger until the client has read its 503, at most this many at
# once (beyond, they are closed without an answer); their descriptors are set aside too.
REFUSAL_SLOTS = HTTP_REFUSALS
REFUSAL_LINGER_SECONDS = 1.0

_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 21\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"too many connections\n"
)

log = structlog.get_logger("portscan_exporter")

RequestFactory = Callable[
    [RawRequestMessage, StreamReader, RequestHandler, AbstractStreamWriter, "asyncio.Task[None]"],
    web.BaseRequest,
]


class BoundedServer(web.Server):
    """aiohttp's server with a connection cap and a deadline for each first request's headers."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Any],
        *,
        header_timeout: float,
        max_connections: int,
        refusal_slots: int = REFUSAL_SLOTS,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.refused = 0
        self.timed_out = 0
        self.refusal_slots = refusal_slots
        self._open: set[RequestHandler] = set()
        self._refusing: set[RequestHandler] = set()
        self._timers: dict[RequestHandler, asyncio.TimerHandle] = {}
        parse: RequestFactory = self.request_factory

        def headers_parsed(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            timer = self._timers.pop(protocol, None)
            if timer is not None:
                timer.cancel()
            return parse(message, payload, protocol, writer, task)

        self.request_factory = headers_parsed

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def lingering_refusals(self) -> int:
        return len(self._refusing)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._open) >= self.max_connections:
            self._refuse(handler, transport)
            return
        self._open.add(handler)
        loop = asyncio.get_running_loop()
        self._timers[handler] = loop.call_later(
            self.header_timeout, self._headers_too_slow, handler
        )

    def _refuse(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        if self.refused % 1000 == 0:
            log.warning(
                "too many HTTP connections, refusing new ones",
                max_connections=self.max_connections,
                refused=self.refused + 1,
            )
        self.refused += 1
        transport.write(_REFUSAL)
        loop = asyncio.get_running_loop()
        if len(self._refusing) < self.refusal_slots and transport.can_write_eof():
            # Closing a socket with unread input makes the kernel send a reset, which can
            # destroy the answer before the client reads it: end our side after the answer,
            # discard what the client sends (a closing handler ignores input) and close when
            # the client does, or after a moment.
            transport.write_eof()
            handler.close()
            self._refusing.add(handler)
            self._timers[handler] = loop.call_later(REFUSAL_LINGER_SECONDS, handler.force_close)
        else:
            # Closed on the next turn of the loop, after the handler has started its task:
            # closing it here would run `connection_lost` first, and the task would then
            # start on a detached handler and fail.
            loop.call_soon(handler.force_close)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._open.discard(handler)
        self._refusing.discard(handler)
        timer = self._timers.pop(handler, None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(handler, exc)

    def _headers_too_slow(self, handler: RequestHandler) -> None:
        # No request has started on this connection (the timer is cancelled when one does),
        # so closing it interrupts nothing.
        self._timers.pop(handler, None)
        self.timed_out += 1
        handler.force_close()


class BoundedAppRunner(web.AppRunner):
    """An `AppRunner` whose server is a `BoundedServer`."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, keepalive_timeout=idle_timeout, **kwargs)
        self._header_timeout = header_timeout
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        # aiohttp's own server (built after the app's startup hooks ran, with the handler
        # arguments the app asks for) is rebuilt as a BoundedServer with the same arguments;
        # no connection has reached it yet.
        plain = await super()._make_server()
        return BoundedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            loop=asyncio.get_running_loop(),
            header_timeout=self._header_timeout,
            max_connections=self._max_connections,
            **plain._kwargs,
        )
