"""One probe engine for every host being scanned at once.

Why one
-------
A host scan used to bring its own machinery: an epoll set registered with the event loop, a
deadline heap with its own timer, and sockets of its own. Scanning a fleet, that fixed cost
is paid per host (a 100-port scan of an answering host made 64 sockets for its first window),
and with hundreds of hosts scanned at once the loop woke once per host for what one wake-up
could do. So the hosts being scanned share one engine per process: each scanner process has
one (exporter.scanner.processes), the daemon's own process has one when it scans itself, and
`scan_host` makes one for a call without an engine:

- ONE epoll set holds every probe socket of every host, and only its descriptor is
  registered with the event loop: one readiness callback reports a batch of finished
  handshakes whatever host they belong to. It is opened when the first scan starts and
  closed when the last one ends (after `linger` seconds, in case another host follows), so
  an idle engine holds no descriptor and no event loop.
- ONE deadline heap (lazy deletion: an entry is one launch round of one host, skipped
  probe by probe once concluded) and ONE timer, armed a little after the earliest deadline
  of all (DEADLINE_SLACK) so that the deadlines of many hosts' small rounds expire together.
- ONE global window, the `ProbeBudget` (`scan.max_probes`: probes in flight across all
  hosts), handed out at the end of every round to the hosts waiting for slots, in turn, so a
  firewalled host holding slots for whole timeouts cannot starve the others beyond its share
  (see exporter.scanner.budget).
- ONE pool of spare sockets: a refused attempt's socket, reset by the connect() that read the
  refusal, serves any host's next probe, so scanning hosts one after the other does not make
  and close a window of sockets per host (64 even for a short scan: socket(), epoll_ctl()
  and close() each, a good part of such a scan's CPU time). Spares stay in the epoll set,
  registered edge-triggered so that an unconnected socket is not reported on every poll;
  spares and probes in flight together never exceed the window the open-file limit was sized
  for.

What stays per host (`ConnectScan`): its queue of ports, tries, results, RTT estimate,
Little's-law window and its politeness limits (`concurrency`, `rate`). Those limit what one
target sees; they are not a way to bound the fleet's throughput, which is the global window's
job.

A round
-------
Every callback of the engine is one round: collect what happened (readiness, or expired
deadlines after draining readiness first), account for it per host and globally, then let
the budget hand out the free slots (the hosts launch their next probes), then close the
spare sockets beyond the window, then tell hosts that have nothing left that they are done.
Launching only at the end of a round batches it: one host launching 40 probes once instead
of 40 times one.

Cancelling one host's scan closes its sockets, returns its slots and leaves the engine to
the other hosts (who get the freed slots on the next loop iteration).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import heapq
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from exporter.scanner.budget import ProbeBudget

if TYPE_CHECKING:
    from exporter.scanner.connect import ConnectScan

# (host scan, socket address, socket, started): a tuple is the cheapest record to build per
# probe, and the address (with the port) is exactly what a second connect() needs.
Probe = tuple["ConnectScan", tuple[Any, ...], _socket.socket, float]

# Edge-triggered: a spare socket (unconnected, in the set while it waits for its next probe)
# is reported once when its attempt ends, not on every epoll_wait until it is reused.
EPOLL_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP | select.EPOLLET
# The timer fires this long after the earliest deadline and expires every probe due by
# then: probes wait at most this much past their timeout, and the deadlines of many small
# launch rounds (one per host, a few probes each when the window is contended) expire in one
# round instead of one timer callback each.
DEADLINE_SLACK = 0.01
HELD_WEIGHT = 1 / 32  # of the newest sample in a host's moving average of slot hold times
_ECONNREFUSED = errno.ECONNREFUSED
_EALREADY = errno.EALREADY
_SOL_SOCKET = socket.SOL_SOCKET
_SO_ERROR = socket.SO_ERROR
_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96


class ProbeEngine:
    """Probes in flight of every host scan that uses it, under one global window."""

    def __init__(self, max_probes: int, *, linger: float = 0.0) -> None:
        self.budget = ProbeBudget(max_probes)
        # How long an engine left without scans keeps its epoll set and spare sockets for
        # the next scan: a pipeline's hosts follow each other, one call's scan has no next.
        self.linger = linger
        self._linger_timer: asyncio.TimerHandle | None = None
        # Every probe in flight, by socket descriptor, whatever its host.
        self.probes: dict[int, Probe] = {}
        self._deadlines: list[tuple[float, int, ConnectScan, list[Probe]]] = []
        self._seq = 0
        self._scans: set[ConnectScan] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: select.epoll | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._serve_scheduled = False
        # Refused attempts' sockets, ready for another probe: see `spares`.
        self._spares: dict[tuple[int, object, bool], list[_socket.socket]] = {}
        self.readiness_sets = 0  # epoll sets opened so far: one per busy period

    @property
    def max_probes(self) -> int:
        return self.budget.limit

    @property
    def in_flight(self) -> int:
        return self.budget.in_flight

    @property
    def spare_sockets(self) -> int:
        return sum(map(len, self._spares.values()))

    @property
    def hosts(self) -> int:
        """Host scans using the engine now."""
        return len(self._scans)

    # -- hosts come and go -----------------------------------------------------------------

    def attach(self, scan: ConnectScan) -> None:
        loop = asyncio.get_running_loop()
        if self._poller is not None and loop is not self._loop:
            if self._scans:
                raise RuntimeError("the probe engine is in use by another event loop")
            self._close()  # lingering for a loop that has moved on
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._poller is None:
            self._loop = loop
            self._poller = select.epoll()
            loop.add_reader(self._poller.fileno(), self._on_ready)
            self.readiness_sets += 1
        self._scans.add(scan)
        self.budget.join(scan)

    def detach(self, scan: ConnectScan) -> None:
        """Close the probes `scan` still has, return their slots, and forget it."""
        if scan not in self._scans:
            return
        self._scans.discard(scan)
        if scan.in_flight:
            # Rare (a cancelled or failed scan): a walk over all probes beats a per-host map
            # kept up to date on every probe.
            mine = [fd for fd, probe in self.probes.items() if probe[0] is scan]
            for fd in mine:
                self.probes.pop(fd)[2].close()
            self.budget.release(scan.in_flight)
            scan.in_flight = 0
        self.budget.leave(scan)
        if self._scans:
            self._schedule_serve()  # the freed slots go to the others
            return
        # Nothing in flight any more: every deadline is stale.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        if self.linger > 0 and self._loop is not None:
            self._linger_timer = self._loop.call_later(self.linger, self._close)
        else:
            self._close()

    def request(self, scan: ConnectScan) -> None:
        """`scan` can launch (it has just started, or its rate pause or retry delay is over).

        Slots are handed out on the next loop iteration, not now: hosts started together
        then all count in the shares before the first of them takes any."""
        if scan in self._scans:
            self.budget.want(scan)
            self._schedule_serve()

    def _close(self) -> None:
        """Give back the epoll set and the spare sockets (no scan is attached)."""
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        for probe in self.probes.values():  # none, unless a scan ended without detaching
            probe[2].close()
        self.probes.clear()
        for spares in self._spares.values():
            for sock in spares:
                sock.close()
            spares.clear()
        self._serve_scheduled = False
        if self._poller is not None:
            assert self._loop is not None
            if not self._loop.is_closed():
                self._loop.remove_reader(self._poller.fileno())
            self._poller.close()
            self._poller = None
        self._loop = None

    # -- what hosts call while launching ---------------------------------------------------

    def spares(self, family: int, sockaddr: tuple[object, ...]) -> list[_socket.socket]:
        """The spare sockets a host at `sockaddr` takes before making new ones.

        A refused attempt's socket is reusable for another host: the second connect() that
        read the refusal also reset it (tcp_disconnect: no local address, port or route
        kept). Two things stay, so sockets are pooled by them: the interface of a link-local
        IPv6 address (its scope id), and the IPv4 internals an IPv6 socket takes on for a
        v4-mapped address (such a socket never connects to a native IPv6 one again).
        """
        key: tuple[int, object, bool] = (family, 0, False)
        if family == socket.AF_INET6:
            packed = socket.inet_pton(family, str(sockaddr[0]).partition("%")[0])
            key = (family, sockaddr[3], packed.startswith(_V4_MAPPED))
        return self._spares.setdefault(key, [])

    @property
    def register(self) -> Callable[[int, int], None]:
        """The bound `epoll.register`, for a host's launch loop to call per new socket."""
        assert self._poller is not None
        return self._poller.register

    def expire_at(self, deadline: float, scan: ConnectScan, batch: list[Probe]) -> None:
        """The probes of `batch` go unanswered at `deadline`, unless concluded before."""
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, scan, batch))
        when = deadline + DEADLINE_SLACK
        if self._timer is None or when < self._timer_when:
            assert self._loop is not None
            if self._timer is not None:
                self._timer.cancel()
            self._timer_when = when
            self._timer = self._loop.call_at(when, self._on_deadline)

    # -- rounds ----------------------------------------------------------------------------

    def _on_ready(self) -> None:
        touched: dict[ConnectScan, float | None] = {}
        self._drain(touched)
        self._end_round(touched)

    def _drain(self, touched: dict[ConnectScan, float | None]) -> None:
        """Collect every finished handshake. `touched` gets each host that had one, with
        the start of its last refused probe (its RTT sample for this round)."""
        poller, loop = self._poller, self._loop
        if poller is None or loop is None:
            return
        probes = self.probes
        released = 0
        # Room for every socket in the set: one epoll_wait drains all readiness.
        events = poller.poll(0, len(probes) + self.spare_sockets + 1)
        now = loop.time()
        for fd, _events in events:
            probe = probes.get(fd)
            if probe is None:
                continue
            scan, sockaddr, sock, started = probe
            # A second connect() on a finished attempt returns its outcome (and, when
            # the attempt failed, readies the socket for the next port): one syscall
            # instead of getsockopt(SO_ERROR) + close() + socket() + epoll_ctl().
            err = sock.connect_ex(sockaddr)
            if err == _ECONNREFUSED:
                # The common case, inlined: a closed port; its socket is reused.
                del probes[fd]
                scan.closed.append(sockaddr[1])
                scan.idle.append(sock)
                scan.in_flight -= 1
                scan.held += (now - started - scan.held) * HELD_WEIGHT
                touched[scan] = started
                released += 1
            elif err != _EALREADY:  # EALREADY: not finished after all
                del probes[fd]
                scan.in_flight -= 1
                released += 1
                scan.conclude(sockaddr[1], sock, started, err, now)
                touched.setdefault(scan, None)
        self.budget.release(released)
        for scan, last in touched.items():
            if last is not None:
                scan.rtt.observe(now - last)  # one sample per host and round is plenty

    def _on_deadline(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        touched: dict[ConnectScan, float | None] = {}
        # Answers that already arrived win over the clock.
        self._drain(touched)
        now = loop.time()
        deadlines, probes = self._deadlines, self.probes
        released = 0
        while deadlines and deadlines[0][0] <= now:
            _, _, scan, batch = heapq.heappop(deadlines)
            for probe in batch:
                _, sockaddr, sock, started = probe
                fd = sock.fileno()
                if fd < 0 or probes.get(fd) is not probe:
                    continue  # concluded already
                del probes[fd]
                scan.in_flight -= 1
                released += 1
                touched.setdefault(scan, None)
                err = sock.connect_ex(sockaddr)
                if err == _EALREADY:
                    # Still in SYN_SENT. An ICMP error (port/host unreachable) is only a
                    # "soft" error there: the kernel keeps retrying and never wakes epoll,
                    # but SO_ERROR reports it.
                    err = sock.getsockopt(_SOL_SOCKET, _SO_ERROR) or errno.ETIMEDOUT
                    scan.conclude(sockaddr[1], sock, started, err, now, reusable=False)
                else:
                    scan.conclude(sockaddr[1], sock, started, err, now)
        self.budget.release(released)
        if deadlines:
            self._timer_when = deadlines[0][0] + DEADLINE_SLACK
            self._timer = loop.call_at(self._timer_when, self._on_deadline)
        self._end_round(touched)

    def _end_round(self, touched: dict[ConnectScan, float | None]) -> None:
        want = self.budget.want
        for scan in touched:
            if scan.wants():
                want(scan)
        self._serve()
        for scan in touched:
            scan.check_done()

    def _serve(self) -> None:
        self.budget.serve()
        # Spare sockets and probes in flight together stay within the window, which is what
        # the open-file limit was sized for.
        excess = self.spare_sockets - self.budget.free
        for spares in self._spares.values():
            while excess > 0 and spares:
                spares.pop().close()
                excess -= 1

    def _schedule_serve(self) -> None:
        if not self._serve_scheduled and self._loop is not None:
            self._serve_scheduled = True
            self._loop.call_soon(self._scheduled_serve)

    def _scheduled_serve(self) -> None:
        self._serve_scheduled = False
        if self._poller is not None:
            self._serve()
