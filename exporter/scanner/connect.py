"""TCP connect scan of one host.

Theory of operation
-------------------
A port is probed with a non-blocking `connect()`. The kernel does the handshake; we only
learn how it ended: connected (open), refused (closed: RST, or ICMP port unreachable), an ICMP
error (filtered), or nothing within our timeout (unanswered: retried, then filtered).

Per-port cost decides how long a full 1-65535 scan takes. An asyncio `sock_connect` per port
costs a future, a task step and a writer registration on the event loop (~100 us here). So
the sockets of one host scan are registered in a private epoll set instead, and only that
epoll descriptor is registered with the event loop: one readiness callback reports a whole
batch of finished handshakes, and one timer (armed at the earliest deadline) expires a batch
of unanswered ones. Deadlines sit in a heap with lazy deletion.

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
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import heapq
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from exporter.model import ScanResult
from exporter.scanner.budget import ProbeBudget
from exporter.scanner.timing import DEFAULT_MIN_TIMEOUT, RttEstimator

_LINGER_RST = struct.pack("ii", 1, 0)
_REFUSED = frozenset({errno.ECONNREFUSED, errno.ECONNRESET})
_ECONNREFUSED = errno.ECONNREFUSED
_HELD_WEIGHT = 1 / 32  # of the newest sample in the moving average of slot hold times
# Transient local shortages: the probe never left this machine, so it is put back in the
# queue without counting as an attempt, and the window shrinks.
_LOCAL_SHORTAGE = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL, errno.EAGAIN}
)
_EPOLL_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
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


# (port, socket, started): a tuple is the cheapest record to build 65,535 times.
_Probe = tuple[int, _socket.socket, float]


class ConnectScan:
    """The probes of one host scan, driven by event-loop callbacks. Use `run()` once."""

    def __init__(
        self,
        family: socket.AddressFamily,
        sockaddr: tuple[object, ...],
        ports: Iterable[int],
        options: ScanOptions,
        budget: ProbeBudget | None = None,
    ) -> None:
        self._family = family
        self._sockaddr_tail = tuple(sockaddr[2:])  # IPv6 flowinfo and scope id
        self._address = sockaddr[0]
        self._options = options
        self._budget = budget
        self._queue: deque[int] = deque(dict.fromkeys(ports))
        self.ports_scanned = len(self._queue)
        self._tries: dict[int, int] = {}
        self._inflight: dict[int, _Probe] = {}
        self._idle: list[_socket.socket] = []  # failed attempts' sockets, reusable
        self._deadlines: list[tuple[float, int, list[_Probe]]] = []
        self._seq = 0
        # The window (probes in flight) follows Little's law: the throughput we can drive
        # times how long a probe holds its slot. Answered probes free their slot at once,
        # so a host that answers everything needs few (and more only costs kernel time:
        # every socket in flight is a bound ephemeral port); a host that drops probes holds
        # each slot for a whole timeout and gets up to `concurrency`.
        self._held = 0.0  # moving average of the seconds a probe holds its slot
        self._cap = options.concurrency  # lowered for a while after a local shortage
        self._window = min(MIN_WINDOW, options.concurrency)
        self._granted = 0
        self._next_send = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._fill_scheduled = False
        self._rate_wait = False
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
        self._poller = select.epoll()
        self._loop.add_reader(self._poller.fileno(), self._on_ready)
        try:
            self._fill()
            self._check_done()
            await self._done
        finally:
            self._teardown()

    # -- launching -------------------------------------------------------------------------

    def _take_slot(self) -> bool:
        assert self._budget is not None
        if self._granted:
            self._granted -= 1
            return True
        if self._budget.try_acquire():
            return True
        self._budget.wait(self._on_grant)
        return False

    def _give_back_slot(self) -> None:
        if self._budget is not None:
            self._budget.release()

    def _on_grant(self) -> bool:
        self._granted += 1
        self._schedule_fill()
        return self._wants_more()

    def _wants_more(self) -> bool:
        return (
            len(self._queue) > self._granted and len(self._inflight) + self._granted < self._window
        )

    def _return_unused_grants(self) -> None:
        if self._budget is None or not self._granted or self._queue:
            return
        self._budget.cancel(self._on_grant)
        while self._granted:
            self._granted -= 1
            self._budget.release()

    def _schedule_fill(self) -> None:
        if not self._fill_scheduled:
            self._fill_scheduled = True
            self._loop.call_soon(self._scheduled_fill)

    def _scheduled_fill(self) -> None:
        self._fill_scheduled = False
        self._fill()
        self._check_done()

    def _fill(self) -> None:
        # The hot path: one iteration per probe. Locals and a tuple per probe keep the
        # interpreter's share of a full-range scan below the kernel's.
        queue, inflight, window = self._queue, self._inflight, self._update_window()
        rate, budget = self._options.rate, self._budget
        family, address, tail = self._family, self._address, self._sockaddr_tail
        register, deadlines, idle = self._poller.register, self._deadlines, self._idle
        now = self._loop.time()
        batch: list[_Probe] = []
        while queue and len(inflight) < window:
            if rate:
                now = self._loop.time()
                if now < self._next_send:
                    if not self._rate_wait:
                        self._rate_wait = True
                        self._loop.call_at(self._next_send, self._rate_resume)
                    break
            if budget is not None and not self._take_slot():
                break
            if rate:
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
                    self._give_back_slot()
                    self._local_shortage(port, exc.errno)
                    break
                registered = False
            err = sock.connect_ex((address, port, *tail))
            self.probes_sent += 1
            probe = (port, sock, now)
            if err == errno.EINPROGRESS:
                fd = sock.fileno()
                inflight[fd] = probe
                self._stalls = 0
                if not registered:
                    register(fd, _EPOLL_EVENTS)
                batch.append(probe)
            elif err in _LOCAL_SHORTAGE:
                sock.close()
                self.probes_sent -= 1
                self._give_back_slot()
                self._local_shortage(port, err)
                break
            else:
                if not registered:  # _conclude may hand it back to `idle` for reuse
                    register(sock.fileno(), _EPOLL_EVENTS)
                # Loopback handshakes can finish inside connect(); 0 then means connected.
                self._conclude(probe, err, self._loop.time())
        if batch:
            # One heap entry per round, not per probe: most probes finish long before it.
            deadline = self._loop.time() + self.rtt.timeout
            self._seq += 1
            heapq.heappush(deadlines, (deadline, self._seq, batch))
            self._arm_timer(deadline)
        # Sockets not reused in this round are closed (which also drops them from the
        # epoll set): an idle socket in CLOSE state would be reported ready forever.
        for sock in idle:
            sock.close()
        idle.clear()
        self._return_unused_grants()

    def _rate_resume(self) -> None:
        self._rate_wait = False
        self._scheduled_fill()

    def _local_shortage(self, port: int, err: int | None) -> None:
        # A shortage that persists with nothing in flight is no shortage: EADDRNOTAVAIL is
        # also what connect() says, forever, to ::1 where IPv6 is disabled.
        if not self._inflight:
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
        self._cap = self._window = max(1, len(self._inflight))
        if not self._inflight:
            self._loop.call_later(STALL_RETRY_SECONDS, self._schedule_fill)

    # -- completions -----------------------------------------------------------------------

    def _on_ready(self) -> None:
        now = self._loop.time()
        inflight, conclude = self._inflight, self._conclude
        address, tail = self._address, self._sockaddr_tail
        closed, idle = self.closed, self._idle
        held, refused, started = self._held, 0, now
        for fd, _events in self._poller.poll(0):
            port, sock, started = probe = inflight[fd]
            # A second connect() on a finished attempt returns its outcome (and, when the
            # attempt failed, readies the socket for the next port): one syscall instead
            # of getsockopt(SO_ERROR) + close() + socket() + epoll_ctl().
            err = sock.connect_ex((address, port, *tail))
            if err == _ECONNREFUSED:
                # The common case, inlined: a closed port; its socket is reused.
                del inflight[fd]
                closed.append(port)
                idle.append(sock)
                held += (now - started - held) * _HELD_WEIGHT
                refused += 1
            elif err != errno.EALREADY:  # EALREADY: not finished after all
                del inflight[fd]
                conclude(probe, err, now)
        if refused:
            self._held = held
            self.rtt.observe(now - started)  # one sample per round is plenty
            if self._budget is not None:
                for _ in range(refused):
                    self._budget.release()
        self._fill()
        self._check_done()

    def _conclude(self, probe: _Probe, err: int, now: float, *, reusable: bool = True) -> None:
        """Record how one handshake ended and free its socket and slot.

        `err` is what connect() said when asked again: 0 (or EISCONN) for a completed
        handshake, ETIMEDOUT for no answer, else the error that ended the attempt.
        """
        port, sock, started = probe
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
                self._idle.append(sock)
            else:
                sock.close()
        self._give_back_slot()
        self._held += (now - started - self._held) * _HELD_WEIGHT
        if self._cap < self._options.concurrency:
            self._cap += 1  # regrow after a local shortage shrank it

    def _update_window(self) -> int:
        self._window = min(self._cap, max(MIN_WINDOW, int(self._held * PROBES_PER_SECOND)))
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

    # -- deadlines -------------------------------------------------------------------------

    def _arm_timer(self, deadline: float) -> None:
        if self._timer is None or deadline < self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_when = deadline
            self._timer = self._loop.call_at(deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        # Answers that already arrived win over the clock.
        self._on_ready()
        now = self._loop.time()
        deadlines, inflight = self._deadlines, self._inflight
        address, tail = self._address, self._sockaddr_tail
        while deadlines and deadlines[0][0] <= now:
            _, _, batch = heapq.heappop(deadlines)
            for probe in batch:
                port, sock, _ = probe
                fd = sock.fileno()
                if fd < 0 or inflight.get(fd) is not probe:
                    continue  # concluded already
                del inflight[fd]
                err = sock.connect_ex((address, port, *tail))
                if err == errno.EALREADY:
                    # Still in SYN_SENT. An ICMP error (port/host unreachable) is only a
                    # "soft" error there: the kernel keeps retrying and never wakes epoll,
                    # but SO_ERROR reports it.
                    err = sock.getsockopt(_SOL_SOCKET, socket.SO_ERROR) or errno.ETIMEDOUT
                    self._conclude(probe, err, now, reusable=False)
                else:
                    self._conclude(probe, err, now)
        if deadlines:
            self._arm_timer(deadlines[0][0])
        self._fill()
        self._check_done()

    # -- end -------------------------------------------------------------------------------

    def _check_done(self) -> None:
        if not self._queue and not self._inflight and not self._done.done():
            self._done.set_result(None)

    def _teardown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._budget is not None:
            self._budget.cancel(self._on_grant)
            for _ in range(self._granted):
                self._budget.release()
            self._granted = 0
        for _, sock, _ in self._inflight.values():
            sock.close()
            self._give_back_slot()
        self._inflight.clear()
        for sock in self._idle:
            sock.close()
        self._idle.clear()
        self._loop.remove_reader(self._poller.fileno())
        self._poller.close()


async def resolve(host: str) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    """The first TCP address of `host`, in the system resolver's preference order."""
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
    budget: ProbeBudget | None = None,
    clock: Callable[[], float] = time.time,
) -> ScanResult:
    """Scan `ports` of `host` (a name or an IP literal), resolving the name now.

    Never raises for the target's behaviour: a name that does not resolve gives a failed
    result with `error` set. Cancelling the awaiting task closes every probe socket.
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
    scan = ConnectScan(family, sockaddr, port_list, options, budget)
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
