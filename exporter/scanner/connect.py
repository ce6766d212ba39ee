"""TCP connect scan of a host.

Theory of operation
-------------------
A port is probed with a non-blocking `connect()`. The kernel does the handshake; we only
learn how it ended: connected (open), refused (closed: RST, or ICMP port unreachable), an ICMP
error (filtered), or nothing within our timeout (unanswered: retried, then filtered).

Per-port cost decides how long a full 1-65535 scan takes. An asyncio `sock_connect` per port
costs a future, a task step and a writer registration on the event loop (~100 us here). So
probe sockets are registered in a private epoll set instead, and only that epoll descriptor
is registered with the event loop: one readiness callback reports a whole batch of finished
handshakes, and one timer (armed just after the earliest deadline) expires a batch of
unanswered ones.

Scanning a fleet, that machinery is shared: every host being scanned uses one
`ProbeEngine` (exporter.scanner.engine), with one epoll set, one deadline heap and timer, and
one global window of probes in flight (`scan.max_probes`) handed out fairly between hosts.
Per-host setup is then a queue and a few counters, and names that are IP literals skip the
resolver (getaddrinfo is a thread-pool round trip even for "10.0.0.1"). What stays per host,
in `ConnectScan`: the queue of ports, tries, results, the RTT estimate, the window below, and
the politeness limits `concurrency` and `rate`, which bound what one target sees.

Each host's window (its probes in flight) follows Little's law: the throughput we aim at
times how long a probe holds its slot. Answered probes free their slot at once, so a host
that answers everything needs few (and more only costs kernel time: every socket in flight is
a bound ephemeral port); a host that drops probes holds each slot for a whole timeout and gets
up to `concurrency`, as far as the global window and the other hosts' shares allow.

Accuracy rules:
- An open port is one whose handshake completed *with the target*: on loopback a socket
  whose ephemeral port equals the destination port connects to itself (TCP simultaneous
  open). We compare local and peer addresses and count that as closed (nothing listens there).
- Before a probe is declared unanswered we drain pending readiness and look at the socket
  once more, so a busy event loop can delay an answer but never turn it into "filtered".
- Unanswered ports go to the back of the queue and are retried `retries` times; random loss
  then costs time, not correctness.
- Probe sockets are closed with SO_LINGER {1, 0}: an RST, no TIME_WAIT, so a full-range scan
  does not exhaust ephemeral ports or leave 65k sockets behind.
- A probe still in SYN_SENT at its deadline may have had an ICMP error, which the kernel
  keeps as a soft error without waking epoll: SO_ERROR tells it.
- A refused attempt's socket is reused for the next probe (connect() again on it), of this
  host or another: the connect() that read the refusal reset it (no local address, port or
  route kept). What does stay (a link-local scope's interface, the IPv4 internals taken on
  for a v4-mapped address) decides which pool a socket goes back to.
- Local shortages (no descriptors, no ephemeral ports, no memory) put the port back without
  counting an attempt and shrink the host's window; one that persists with nothing in flight
  fails the scan instead of retrying forever (connect() to ::1 where IPv6 is disabled says
  EADDRNOTAVAIL forever).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from exporter.model import ScanResult
from exporter.scanner.engine import EPOLL_EVENTS, HELD_WEIGHT, Probe, ProbeEngine
from exporter.scanner.timing import DEFAULT_MIN_TIMEOUT, RttEstimator

_LINGER_RST = struct.pack("ii", 1, 0)
_REFUSED = frozenset({errno.ECONNREFUSED, errno.ECONNRESET})
_EINPROGRESS = errno.EINPROGRESS
# Transient local shortages: the probe never left this machine, so it is put back in the
# queue without counting as an attempt, and the window shrinks.
_LOCAL_SHORTAGE = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL, errno.EAGAIN}
)
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_SOL_SOCKET = socket.SOL_SOCKET


# Retrying a local shortage (no descriptors, no ephemeral ports) with nothing in flight:
# every 50 ms for at most 2 s, then the scan fails instead of waiting forever.
STALL_RETRY_SECONDS = 0.05
MAX_STALLS = 40
# The window never drops below this; it grows with the time probes wait for answers.
MIN_WINDOW = 64
# Well below what one event loop sustains on loopback (~200,000 probes/s): with a higher
# target, the loop's own latency would count as waiting and inflate the window.
PROBES_PER_SECOND = 50_000


@dataclass(frozen=True, slots=True)
class ScanOptions:
    """How hard to probe one host."""

    timeout: float = 1.0  # ceiling for one connect attempt; the RTT estimate decides below it
    retries: int = 1  # extra attempts for an unanswered port
    concurrency: int = 256  # probes in flight for this host
    rate: float = 0.0  # probes started per second, 0 = unlimited
    min_timeout: float = DEFAULT_MIN_TIMEOUT

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate < 0:
            raise ValueError("rate must be >= 0")


class ConnectScan:
    """The probes of one host scan, launched and concluded by a `ProbeEngine`.

    Use `run()` once. The engine reads and updates `in_flight`, `held`, `closed`, `idle` and
    `rtt` directly in its readiness loop, the hottest path of a scan.
    """

    def __init__(
        self,
        family: socket.AddressFamily,
        sockaddr: tuple[object, ...],
        ports: Iterable[int],
        options: ScanOptions,
        engine: ProbeEngine,
    ) -> None:
        self._family = family
        self._sockaddr_tail = tuple(sockaddr[2:])  # IPv6 flowinfo and scope id
        self._address = sockaddr[0]
        self._options = options
        self._engine = engine
        self._queue: deque[int] = deque(dict.fromkeys(ports))
        self.ports_scanned = len(self._queue)
        self._tries: dict[int, int] = {}
        self.in_flight = 0  # probes holding a slot of the engine's global window
        # Refused attempts' sockets, this host's and the others', shared through the engine.
        self.idle = engine.spares(family, sockaddr)
        self.held = 0.0  # moving average of the seconds a probe holds its slot
        self._cap = options.concurrency  # lowered for a while after a local shortage
        self._window = min(MIN_WINDOW, options.concurrency)
        self._next_send = 0.0
        self._paused = False  # waiting for the rate limit or a shortage's retry delay
        self._resume_handle: asyncio.TimerHandle | None = None
        self.rtt = RttEstimator(ceiling=options.timeout, floor=options.min_timeout)
        self.open: list[int] = []
        self.closed: list[int] = []
        self.filtered: list[int] = []
        self.probes_sent = 0
        self.local_shortages = 0
        self._stalls = 0  # shortages in a row with nothing in flight

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()
        engine = self._engine
        engine.attach(self)
        try:
            engine.request(self)
            self.check_done()
            await self._done
        finally:
            if self._resume_handle is not None:
                self._resume_handle.cancel()
            engine.detach(self)

    # -- what the engine's budget asks ------------------------------------------------------

    def wants(self) -> bool:
        return bool(self._queue) and self.in_flight < self._window and not self._paused

    def launch(self, slots: int) -> int:
        """Start up to `slots` probes, as this host's window and rate allow; return how many
        are now in flight (probes that ended inside connect() hold no slot)."""
        room = min(slots, self._update_window() - self.in_flight)
        if room <= 0 or self._paused:
            return 0
        # The hot path: one iteration per probe. Locals and a tuple per probe keep the
        # interpreter's share of a full-range scan below the kernel's.
        queue, rate, loop = self._queue, self._options.rate, self._loop
        family, address, tail = self._family, self._address, self._sockaddr_tail
        engine, idle = self._engine, self.idle
        register, probes = engine.register, engine.probes
        now = loop.time()
        batch: list[Probe] = []
        while queue and len(batch) < room:
            if rate:
                now = loop.time()
                if now < self._next_send:
                    self._pause(self._next_send)
                    break
                # A few ms of catch-up so timer granularity does not cap the rate.
                self._next_send = max(now - 0.005, self._next_send) + 1.0 / rate
            port = queue.popleft()
            if idle:
                sock = idle.pop()
                registered = True
            else:
                try:
                    sock = _socket.socket(family, _STREAM_NONBLOCK)
                except OSError as exc:
                    self._local_shortage(port, exc.errno)
                    break
                registered = False
            sockaddr: tuple[Any, ...] = (address, port, *tail)
            err = sock.connect_ex(sockaddr)
            self.probes_sent += 1
            if err == _EINPROGRESS:
                fd = sock.fileno()
                if not registered:
                    register(fd, EPOLL_EVENTS)
                probe = (self, sockaddr, sock, now)
                probes[fd] = probe
                batch.append(probe)
                self._stalls = 0
            elif err in _LOCAL_SHORTAGE:
                sock.close()
                self.probes_sent -= 1
                self._local_shortage(port, err)
                break
            else:
                if not registered:  # conclude() may keep it in `idle` for reuse
                    register(sock.fileno(), EPOLL_EVENTS)
                # Loopback handshakes can finish inside connect(); 0 then means connected.
                self.conclude(port, sock, now, err, loop.time())
        if batch:
            self.in_flight += len(batch)
            # One deadline per round, not per probe: most probes finish long before it.
            engine.expire_at(loop.time() + self.rtt.timeout, self, batch)
        self.check_done()
        return len(batch)

    def _pause(self, until: float) -> None:
        self._paused = True
        self._resume_handle = self._loop.call_at(until, self._resume)

    def _resume(self) -> None:
        self._paused = False
        self._resume_handle = None
        self._engine.request(self)

    def _local_shortage(self, port: int, err: int | None) -> None:
        # A shortage that persists with nothing in flight is no shortage: EADDRNOTAVAIL is
        # also what connect() says, forever, to ::1 where IPv6 is disabled.
        if not self.in_flight:
            self._stalls += 1
        if err not in _LOCAL_SHORTAGE or self._stalls > MAX_STALLS:
            self._queue.clear()
            if not self._done.done():
                reason = os.strerror(err) if err else "unknown error"
                self._done.set_exception(OSError(err, f"cannot probe: {reason}"))
            return
        self.local_shortages += 1
        self._queue.appendleft(port)
        # Keep what is in flight going; with nothing in flight, retry shortly.
        self._cap = self._window = max(1, self.in_flight)
        if not self.in_flight:
            self._pause(self._loop.time() + STALL_RETRY_SECONDS)

    # -- completions -----------------------------------------------------------------------

    def conclude(
        self,
        port: int,
        sock: _socket.socket,
        started: float,
        err: int,
        now: float,
        *,
        reusable: bool = True,
    ) -> None:
        """Record how one handshake ended and free its socket (its slot is the caller's).

        `err` is what connect() said when asked again: 0 (or EISCONN) for a completed
        handshake, ETIMEDOUT for no answer, else the error that ended the attempt.
        """
        if err == 0 or err == errno.EISCONN:
            self.rtt.observe(now - started)
            if self._connected_to_itself(sock):
                self.closed.append(port)
            else:
                self.open.append(port)
            # An RST instead of a FIN handshake: no TIME_WAIT left behind per open port.
            sock.setsockopt(_SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            sock.close()
        elif err == errno.ETIMEDOUT:
            self._unanswered(port)
            sock.close()
        else:
            if err in _REFUSED:
                self.rtt.observe(now - started)
                self.closed.append(port)
            else:
                # ICMP host/net unreachable, administratively prohibited, or a local
                # firewall: something other than the target's TCP stack answered, as
                # nmap -sT reports it.
                self.filtered.append(port)
            if reusable:
                # The failed attempt left the socket unconnected and still in the epoll set.
                self.idle.append(sock)
            else:
                sock.close()
        self.held += (now - started - self.held) * HELD_WEIGHT
        if self._cap < self._options.concurrency:
            self._cap += 1  # regrow after a local shortage shrank it

    def _update_window(self) -> int:
        self._window = min(self._cap, max(MIN_WINDOW, int(self.held * PROBES_PER_SECOND)))
        return self._window

    @staticmethod
    def _connected_to_itself(sock: _socket.socket) -> bool:
        try:
            return bool(sock.getsockname() == sock.getpeername())
        except OSError:
            return False

    def _unanswered(self, port: int) -> None:
        tries = self._tries.get(port, 0) + 1
        if tries > self._options.retries:
            self.filtered.append(port)
            self._tries.pop(port, None)
        else:
            self._tries[port] = tries
            self._queue.append(port)

    def check_done(self) -> None:
        if not self._queue and not self.in_flight and not self._done.done():
            self._done.set_result(None)


# -- addresses --------------------------------------------------------------------------------


def _scope_by_name(packed: bytes) -> bool:
    # getaddrinfo (glibc) takes an interface name as the scope of link-local unicast and of
    # node- and link-local multicast addresses only; a number, for any IPv6 address.
    return (packed[0] == 0xFE and packed[1] & 0xC0 == 0x80) or (
        packed[0] == 0xFF and packed[1] & 0x0F in (1, 2)
    )


def ip_literal(host: str) -> tuple[socket.AddressFamily, tuple[object, ...]] | None:
    """`host` as getaddrinfo would return it when it is a plain IPv4 or IPv6 literal (an
    IPv6 one may carry a %scope); None for anything else, names included.

    Forms only getaddrinfo knows ("127.1", "0x7f.0.0.1", "01.2.3.4") are left to it.
    """
    address, percent, scope = host.partition("%")
    try:
        if not percent:
            try:
                packed = socket.inet_pton(socket.AF_INET, host)
            except OSError:
                pass
            else:
                return socket.AF_INET, (socket.inet_ntop(socket.AF_INET, packed), 0)
        packed = socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        return None
    scope_id = 0
    if percent:
        if scope.isascii() and scope.isdigit():
            scope_id = int(scope)
            if scope_id > 0xFFFF_FFFF:
                return None
        elif _scope_by_name(packed):
            try:
                scope_id = socket.if_nametoindex(scope)
            except (OSError, ValueError):
                return None
        else:
            return None
    return socket.AF_INET6, (socket.inet_ntop(socket.AF_INET6, packed), 0, 0, scope_id)


async def resolve(host: str) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    """The first TCP address of `host`, in the system resolver's preference order.

    An IP literal is parsed here: the resolver would only parse it too, after a round trip
    through the thread pool.
    """
    literal = ip_literal(host)
    if literal is not None:
        return literal
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return family, tuple(sockaddr)
    raise socket.gaierror(socket.EAI_FAMILY, "no IPv4 or IPv6 address")


async def scan_host(
    host: str,
    ports: Iterable[int],
    options: ScanOptions | None = None,
    *,
    engine: ProbeEngine | None = None,
    clock: Callable[[], float] = time.time,
) -> ScanResult:
    """Scan `ports` of `host` (a name or an IP literal), resolving the name now.

    `engine` is the probe engine shared with the other hosts being scanned; without one the
    scan gets its own, whose global window is the host's concurrency.

    Never raises for the target's behaviour: a name that does not resolve gives a failed
    result with `error` set. Cancelling the awaiting task closes every probe socket of this
    scan and returns its slots; other scans on the same engine go on.
    """
    options = options or ScanOptions()
    port_list = list(ports)
    started = clock()
    t0 = time.monotonic()
    try:
        family, sockaddr = await resolve(host)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        return ScanResult(
            host=host,
            address=None,
            started=started,
            duration_seconds=time.monotonic() - t0,
            ports_scanned=0,
            answered=False,
            error=f"cannot resolve {host}: {reason}",
        )
    if engine is None:
        engine = ProbeEngine(options.concurrency)
    scan = ConnectScan(family, sockaddr, port_list, options, engine)
    try:
        await scan.run()
    except OSError as exc:
        return ScanResult(
            host=host,
            address=str(sockaddr[0]),
            started=started,
            duration_seconds=time.monotonic() - t0,
            ports_scanned=0,
            answered=False,
            error=f"cannot scan {host} ({sockaddr[0]}): {exc.strerror or exc}",
            probes_sent=scan.probes_sent,
        )
    return ScanResult(
        host=host,
        address=str(sockaddr[0]),
        started=started,
        duration_seconds=time.monotonic() - t0,
        ports_scanned=scan.ports_scanned,
        answered=bool(scan.open or scan.closed),
        open=tuple(sorted(scan.open)),
        closed=tuple(sorted(scan.closed)),
        filtered=tuple(sorted(scan.filtered)),
        probes_sent=scan.probes_sent,
    )
