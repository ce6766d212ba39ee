"""Services that misbehave on purpose, to check that identification stays bounded.

    flood    sends an endless stream of bytes and never closes
    silent   accepts, then never sends and never closes
    garbage  answers every connection and every request with random binary bytes
    huge     sends a 10 MB banner, then closes
    reset    accepts and immediately resets the connection (RST)

Used in-process by tests (`start`) on ephemeral loopback ports, or as a script inside a
network namespace: `python hostile.py flood=7001 silent=7002 ...` (runs until killed).
Standard library only, so it runs under any interpreter without the project installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable

HUGE_BANNER_BYTES = 10 * 1024 * 1024
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    chunk = b"FLOOD " * 10922
    try:
        while True:
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        await _close(writer)


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.read(4096):
            pass  # swallow whatever the client sends, say nothing, never close first
    except (ConnectionError, OSError):
        pass
    finally:
        await _close(writer)


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(os.urandom(512))
        await writer.drain()
        while await reader.read(4096):
            writer.write(os.urandom(512))
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        await _close(writer)


async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    block = b"220 " + b"x" * 65532
    try:
        for _ in range(HUGE_BANNER_BYTES // len(block)):
            writer.write(block)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        await _close(writer)


async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # Linger 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


BEHAVIOURS: dict[str, Handler] = {
    "flood": flood,
    "silent": silent,
    "garbage": garbage,
    "huge": huge,
    "reset": reset,
}


async def start(kind: str, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Serve behaviour `kind` on host:port (0 = an ephemeral port)."""
    return await asyncio.start_server(BEHAVIOURS[kind], host, port)


async def _main(specs: list[str]) -> None:
    servers = []
    for spec in specs:
        kind, _, port = spec.partition("=")
        servers.append(await start(kind, "127.0.0.1", int(port)))
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
