"""One TCP connection to the port being identified, under the port's budget.

Every read and write goes through `Connection`, so the two limits of one port's
identification hold whatever the service does: a deadline shared by all of the port's
connections, and a number of bytes it may read in total. A service that floods, stays silent,
sends garbage or never closes costs at most those.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..model import TLSInfo
from .tls import client_context, session_info, sni_name

# Opens a TCP connection and returns the connected socket. The default connects directly;
# callers inject their own to bind a source address or to connect from another namespace.
Dialer = Callable[[str, int], Awaitable[socket.socket]]

_READ_CHUNK = 65536


class BudgetExhausted(Exception):
    """The port's byte allowance is used up: stop talking to it."""


@dataclass(slots=True)
class Budget:
    """What one port's identification may still spend, and what it spent."""

    deadline: float  # event-loop time
    bytes_left: int
    bytes_read: int = 0
    probes_sent: int = 0
    connections: int = 0

    def remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()


@dataclass(frozen=True, slots=True)
class Response:
    data: bytes
    closed: bool  # the peer closed (or reset) the connection
    reset: bool


async def default_dialer(address: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        infos = await loop.getaddrinfo(address, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {address}") from None
        family, kind, proto, _, sockaddr = infos[0]
    else:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        kind, proto, sockaddr = socket.SOCK_STREAM, 0, (address, port)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


class Connection:
    """A stream to the port; `abort()` always ends it without waiting for the peer."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: Budget
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.budget = budget
        self.received = False  # anything read yet
        self.sent = False  # anything written yet
        self.tls: TLSInfo | None = None

    @classmethod
    async def open(cls, dialer: Dialer, address: str, port: int, budget: Budget) -> Connection:
        sock = await dialer(address, port)
        try:
            try:
                peer = sock.getpeername()
            except OSError:
                # Accepted, then reset before we got here.
                raise ConnectionResetError(f"port {port} reset the connection") from None
            if sock.getsockname() == peer:
                # TCP self-connect on loopback: nothing listens there.
                raise ConnectionRefusedError(f"self-connect on port {port}")
            # A small read limit keeps asyncio from buffering far past our byte budget.
            reader, writer = await asyncio.open_connection(
                sock=sock, limit=max(1024, budget.bytes_left)
            )
        except BaseException:
            sock.close()
            raise
        budget.connections += 1
        return cls(reader, writer, budget)

    async def send(self, data: bytes) -> None:
        self.sent = True
        self.writer.write(data)
        await self.writer.drain()

    async def read(
        self,
        wait: float,
        *,
        done: Callable[[bytes], bool] | None = None,
        settle: float | None = None,
    ) -> Response:
        """Read until `done(data)`, end of stream, `wait` seconds, or (once something came)
        `settle` seconds without more. Raises `BudgetExhausted` when the byte budget runs out
        (what was read so far is in the exception's `args[0]`)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        data = bytearray()
        while True:
            if self.budget.bytes_left <= 0:
                raise BudgetExhausted(bytes(data))
            until = end
            if data and settle is not None:
                until = min(end, loop.time() + settle)
            timeout = until - loop.time()
            if timeout <= 0:
                return Response(bytes(data), closed=False, reset=False)
            try:
                async with asyncio.timeout(timeout):
                    chunk = await self.reader.read(min(_READ_CHUNK, self.budget.bytes_left))
            except TimeoutError:
                return Response(bytes(data), closed=False, reset=False)
            except (ConnectionError, ssl.SSLError, OSError):
                return Response(bytes(data), closed=True, reset=True)
            if not chunk:
                return Response(bytes(data), closed=True, reset=False)
            self.received = True
            self.budget.bytes_left -= len(chunk)
            self.budget.bytes_read += len(chunk)
            data += chunk
            if done is not None and done(bytes(data)):
                return Response(bytes(data), closed=False, reset=False)

    async def start_tls(self, server_name: str | None) -> TLSInfo:
        """Upgrade this connection to TLS; raises `ssl.SSLError`/`OSError` on failure."""
        await self.writer.start_tls(client_context(), server_hostname=sni_name(server_name))
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is None:
            raise ssl.SSLError("no TLS session after the handshake")
        self.tls = session_info(ssl_object)
        return self.tls

    def abort(self) -> None:
        # No graceful close: a peer that never reads or never closes must not hold us.
        self.writer.transport.abort()
