"""The connect scanner against real sockets in network namespaces with real firewalls.

Many hosts come cheap: in a namespace where `ip route add local 10.83.0.0/16 dev lo` made
every address of the block local, each address is a host with its own listeners and its own
iptables rules, and the kernel's socket table says what is in flight to each.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from exporter import eventloop
from exporter.config import parse_config
from exporter.daemon.pipeline import build_scan_pipeline
from exporter.model import PortState, ScanResult
from exporter.scanner import ProbeEngine, ScanOptions, raise_fd_limit, scan_host
from exporter.scanner.budget import ProbeBudget
from exporter.scanner.connect import resolve
from exporter.scanner.processes import InProcessScanner, ScannerProcesses
from exporter.scanner.timing import RttEstimator
from tests.lab import NetNS, listeners, requires_netns

OPEN = [22, 80, 443, 8080, 31337, 50001]
PREFIX = "psfe"  # the namespaces of this module
FLEET = "10.83.0.0/16"


def scan_in(ns: NetNS, host: str, ports: range | list[int], **options: float) -> ScanResult:
    opts = ScanOptions(**options)  # type: ignore[arg-type]
    raise_fd_limit(opts.concurrency)
    result: ScanResult = ns.call(eventloop.run, scan_host(host, ports, opts))
    return result


# -- pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "ceiling", "floor", "expected"),
    [
        ([], 1.0, 0.1, 1.0),  # nothing measured yet: the configured ceiling
        ([0.0001] * 20, 1.0, 0.1, 0.1),  # LAN-fast host: the floor, not an internet timeout
        ([0.3] * 20, 1.0, 0.1, 0.3),  # steady RTT: about the RTT itself
        ([0.8, 0.9, 1.5, 2.0], 1.0, 0.1, 1.0),  # slow and jittery: capped at the ceiling
        ([0.001] * 5, 0.05, 0.1, 0.05),  # a ceiling below the floor wins
    ],
)
def test_rtt_timeout(samples: list[float], ceiling: float, floor: float, expected: float) -> None:
    rtt = RttEstimator(ceiling=ceiling, floor=floor)
    for sample in samples:
        rtt.observe(sample)
    assert rtt.timeout == pytest.approx(expected, rel=0.05)


def test_rtt_variance_widens_timeout() -> None:
    steady, jittery = RttEstimator(ceiling=5), RttEstimator(ceiling=5)
    for i in range(50):
        steady.observe(0.2)
        jittery.observe(0.1 if i % 2 else 0.3)
    assert jittery.timeout > steady.timeout + 0.1


class FakeHost:
    """A host scan as the budget sees it: `window` probes at most, `ports` to launch."""

    def __init__(self, name: str, window: int, ports: int, log: list[tuple[str, int]]) -> None:
        self.name, self.window, self.ports, self.log = name, window, ports, log
        self.in_flight = 0

    def launch(self, slots: int) -> int:
        started = min(slots, self.window - self.in_flight, self.ports)
        self.in_flight += started
        self.ports -= started
        self.log.append((self.name, started))
        return started

    def wants(self) -> bool:
        return self.ports > 0 and self.in_flight < self.window


# A step: "serve", ("want", host), ("join", host), ("leave", host) or ("finish", host, n): n
# of the host's probes end and it asks for more.
Step = str | tuple[str, str] | tuple[str, str, int]


@pytest.mark.parametrize(
    ("limit", "windows", "steps", "launches", "holding"),
    [
        pytest.param(
            6, {"a": 10, "b": 10, "c": 10}, ["serve"],
            [("a", 2), ("b", 2), ("c", 2)], {"a": 2, "b": 2, "c": 2},
            id="equal shares",
        ),
        pytest.param(
            2, {"a": 5, "b": 5, "c": 5},
            ["serve", ("finish", "a", 1), "serve", ("finish", "b", 1), "serve"],
            [("a", 1), ("b", 1), ("c", 1), ("a", 1)], {"a": 1, "b": 0, "c": 1},
            id="a freed slot goes to the host that waited longest",
        ),
        pytest.param(
            10, {"a": 2, "b": 20}, ["serve"],
            [("a", 2), ("b", 5), ("b", 3)], {"a": 2, "b": 8},
            id="a share a host cannot use goes to the others",
        ),
        pytest.param(
            10, {"a": 20, "b": 20},
            ["serve", ("join", "b"), ("want", "b"), ("finish", "a", 2), "serve"],
            [("a", 10), ("b", 2)], {"a": 8, "b": 2},
            id="a host above its share waits while one below it wants slots",
        ),
        pytest.param(
            12, {"a": 8, "b": 8, "c": 8, "d": 8}, ["serve", ("leave", "d"), "serve"],
            [("a", 3), ("b", 3), ("c", 3), ("d", 3), ("a", 1), ("b", 1), ("c", 1)],
            {"a": 4, "b": 4, "c": 4},
            id="a host leaving returns its slots and grows the others' share",
        ),
    ],
)  # fmt: skip
def test_budget_serves_hosts_in_turn_below_their_share_first(
    limit: int,
    windows: dict[str, int],
    steps: list[Step],
    launches: list[tuple[str, int]],
    holding: dict[str, int],
) -> None:
    log: list[tuple[str, int]] = []
    hosts = {name: FakeHost(name, window, 100, log) for name, window in windows.items()}
    budget = ProbeBudget(limit)
    late = {step[1] for step in steps if isinstance(step, tuple) and step[0] == "join"}
    for name, host in hosts.items():
        if name not in late:
            budget.join(host)
            budget.want(host)
    for step in steps:
        match step:
            case "serve":
                budget.serve()
            case ("join", name):
                budget.join(hosts[name])
            case ("want", name):
                budget.want(hosts[name])
            case ("leave", name):
                gone = hosts.pop(name)
                budget.release(gone.in_flight)
                budget.leave(gone)
            case ("finish", name, int(ended)):
                hosts[name].in_flight -= ended
                budget.release(ended)
                budget.want(hosts[name])
            case _:
                raise AssertionError(f"unknown step {step!r}")
        assert budget.in_flight == sum(h.in_flight for h in hosts.values()) <= limit
        assert budget.peak_in_flight <= limit
    assert [entry for entry in log if entry[1]] == launches
    assert {name: host.in_flight for name, host in hosts.items()} == holding


def test_scan_options_reject_nonsense() -> None:
    for bad in ({"timeout": 0}, {"retries": -1}, {"concurrency": 0}, {"rate": -5}):
        with pytest.raises(ValueError):
            ScanOptions(**bad)


def test_fd_limit_is_raised_for_the_concurrency_asked() -> None:
    assert raise_fd_limit(1000) == 1000


# -- on this machine's loopback, only ports this test opened ----------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_loopback_own_listeners_without_root() -> None:
    listening = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    try:
        open_ports = sorted(s.getsockname()[1] for s in listening)
        closed_port = _free_port()
        result = await scan_host("127.0.0.1", [*open_ports, closed_port])
    finally:
        for sock in listening:
            sock.close()
    assert result.open == tuple(open_ports)
    assert result.closed == (closed_port,)
    assert result.answered and result.ok
    assert result.address == "127.0.0.1"


async def test_unresolvable_name_is_a_failed_scan_not_all_closed() -> None:
    result = await scan_host("no-such-host.invalid", [22, 80])
    assert result.error is not None and "no-such-host.invalid" in result.error
    assert not result.answered and not result.ok
    assert result.open == result.closed == result.filtered == ()


# -- namespace hosts --------------------------------------------------------------------------


@requires_netns
def test_full_range_loopback_exact_and_no_self_connect() -> None:
    with NetNS(PREFIX) as ns, listeners(ns, OPEN):
        result = scan_in(ns, "127.0.0.1", range(1, 65536), concurrency=1024)
    assert result.open == tuple(OPEN)
    assert len(result.closed) == 65535 - len(OPEN)
    assert result.filtered == ()
    assert result.ports_scanned == 65535


@requires_netns
def test_self_connect_is_not_an_open_port() -> None:
    """With a ten-port ephemeral range, probes to those ports often connect to themselves."""
    with NetNS(PREFIX) as ns:
        ns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40009")
        for _ in range(20):
            result = scan_in(ns, "127.0.0.1", range(40000, 40010), concurrency=1)
            assert result.open == ()
            assert len(result.closed) == 10


@requires_netns
def test_firewall_drop_reject_and_icmp() -> None:
    with NetNS(PREFIX) as ns, listeners(ns, OPEN):
        ns.iptables("-A", "INPUT", "-p", "tcp", "--dport", "8080", "-j", "ACCEPT")
        ns.iptables("-A", "INPUT", "-p", "tcp", "--syn", "--dport", "1000:2000", "-j", "DROP")
        ns.iptables(
            "-A", "INPUT", "-p", "tcp", "--dport", "3000:3009",
            "-j", "REJECT", "--reject-with", "tcp-reset",
        )  # fmt: skip
        ns.iptables(
            "-A", "INPUT", "-p", "tcp", "--dport", "4000:4009",
            "-j", "REJECT", "--reject-with", "icmp-port-unreachable",
        )  # fmt: skip
        ns.iptables(
            "-A", "INPUT", "-p", "tcp", "--dport", "5000:5009",
            "-j", "REJECT", "--reject-with", "icmp-admin-prohibited",
        )  # fmt: skip
        ports = [*OPEN, *range(1000, 2001), *range(3000, 3010), *range(4000, 4010)]
        ports += [*range(5000, 5010), *range(6000, 6010)]
        started = time.monotonic()
        result = scan_in(ns, "127.0.0.1", ports, timeout=0.5, retries=1, concurrency=512)
        elapsed = time.monotonic() - started
    assert result.open == tuple(OPEN)
    # nmap -sT: RST and ICMP port-unreachable are "closed"; silence and admin-prohibited
    # are "filtered".
    assert result.filtered == (*range(1000, 2001), *range(5000, 5010))
    assert result.closed == (*range(3000, 3010), *range(4000, 4010), *range(6000, 6010))
    assert result.answered
    # Dropped ports waited for the RTT-derived timeout (0.1 s floor), not 1,001 x 0.5 s x 2.
    assert elapsed < 10


@requires_netns
def test_random_loss_neither_hides_nor_invents_open_ports() -> None:
    with NetNS(PREFIX) as ns, listeners(ns, OPEN):
        ns.iptables(
            "-A", "INPUT", "-p", "tcp", "--syn",
            "-m", "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP",
        )  # fmt: skip
        for _ in range(3):
            ports = [*range(1, 10001), 31337, 50001]
            result = scan_in(ns, "127.0.0.1", ports, retries=3, concurrency=512)
            assert result.open == tuple(OPEN)
            assert result.state_of(31337) is PortState.OPEN


@requires_netns
def test_unreachable_host_answers_nothing() -> None:
    with NetNS(PREFIX) as ns, listeners(ns, OPEN):
        ns.iptables("-A", "INPUT", "-d", "127.0.0.2", "-j", "DROP")
        result = scan_in(ns, "127.0.0.2", OPEN + list(range(100, 200)), timeout=0.3)
    assert not result.answered and not result.ok
    assert result.open == () and result.closed == ()
    assert len(result.filtered) == len(OPEN) + 100


@requires_netns
def test_ipv6_loopback() -> None:
    with NetNS(PREFIX) as ns, listeners(ns, [22, 8443], "::1", socket.AF_INET6):
        result = scan_in(ns, "::1", range(1, 10001))
    assert result.address == "::1"
    assert result.open == (22, 8443)
    assert len(result.closed) == 10000 - 2


@requires_netns
def test_dns_name_is_resolved_at_scan_time() -> None:
    with NetNS(PREFIX) as ns, listeners(ns, [8080]):
        result = scan_in(ns, "localhost", [8080, 8081])
    assert result.host == "localhost"
    assert result.address in ("127.0.0.1", "::1")
    if result.address == "127.0.0.1":
        assert result.open == (8080,)


@requires_netns
def test_a_host_started_while_another_holds_the_window_is_not_starved() -> None:
    """A small host started after a big one finishes long before the big one."""

    async def both() -> tuple[ScanResult, ScanResult, float]:
        engine = ProbeEngine(64)
        opts = ScanOptions(timeout=0.2, retries=0, concurrency=64)
        big = asyncio.create_task(scan_host("127.0.0.2", range(1, 1001), opts, engine=engine))
        # The small host starts once the big one holds every probe of the global window.
        for _ in range(100_000):
            if engine.in_flight >= engine.max_probes:
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError("the big scan never took the whole window")
        small = await scan_host("127.0.0.3", range(1, 101), opts, engine=engine)
        small_done = time.monotonic()
        big_result = await big
        return big_result, small, time.monotonic() - small_done

    with NetNS(PREFIX) as ns:
        ns.iptables("-A", "INPUT", "-d", "127.0.0.2", "-p", "tcp", "--syn", "-j", "DROP")
        big, small, big_after_small = ns.call(eventloop.run, both())
    assert len(small.closed) == 100
    assert len(big.filtered) == 1000
    assert big_after_small > 1.0


@requires_netns
def test_cancelled_scan_closes_every_socket() -> None:
    async def cancel_midway() -> tuple[int, int, int]:
        before = len(os.listdir("/proc/self/fd"))
        task = asyncio.create_task(scan_host("127.0.0.1", range(1, 5001), ScanOptions()))
        await asyncio.sleep(0.2)
        during = len(os.listdir("/proc/self/fd"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return before, during, len(os.listdir("/proc/self/fd"))

    with NetNS(PREFIX) as ns:
        ns.iptables("-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP")
        before, during, after = ns.call(eventloop.run, cancel_midway())
    assert during > before + 50  # probes were in flight
    assert after == before


@requires_netns
def test_rate_limit_paces_probes() -> None:
    with NetNS(PREFIX) as ns:
        started = time.monotonic()
        result = scan_in(ns, "127.0.0.1", range(1, 201), rate=400.0)
        elapsed = time.monotonic() - started
    assert len(result.closed) == 200
    assert elapsed >= 0.4  # 200 probes at 400/s cannot take less than half a second


@requires_netns
def test_address_that_can_never_be_probed_fails_the_scan_quickly() -> None:
    """connect() to ::1 with IPv6 disabled says EADDRNOTAVAIL forever: no endless retry."""
    with NetNS(PREFIX) as ns:
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        ns.run("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1")
        started = time.monotonic()
        result = scan_in(ns, "::1", range(1, 11))
        elapsed = time.monotonic() - started
    assert not result.ok and not result.answered
    assert result.error is not None and "::1" in result.error
    assert elapsed < 10


# -- many hosts, one engine -------------------------------------------------------------------


@contextlib.contextmanager
def fleet() -> Iterator[NetNS]:
    """A namespace in which every address of FLEET is a local host."""
    with NetNS(PREFIX) as ns:
        ns.run("ip", "route", "add", "local", FLEET, "dev", "lo")
        yield ns


def syn_sent() -> Counter[str]:
    """Probes in flight as the kernel sees them: sockets of this thread's namespace in
    SYN_SENT, by destination address."""
    counts: Counter[str] = Counter()
    with open("/proc/thread-self/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "02":  # TCP_SYN_SENT
                address = fields[2].partition(":")[0]
                counts[socket.inet_ntoa(bytes.fromhex(address)[::-1])] += 1
    return counts


def epoll_sets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]"
    return count


class InFlight:
    """Samples `syn_sent()` from the event loop while scans run: the peaks per host and in all."""

    def __init__(self) -> None:
        self.peak: Counter[str] = Counter()
        self.peak_total = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> Counter[str]:
        counts = syn_sent()
        for address, count in counts.items():
            self.peak[address] = max(self.peak[address], count)
        self.peak_total = max(self.peak_total, sum(counts.values()))
        return counts

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.005)

    def __enter__(self) -> InFlight:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@requires_netns
def test_hosts_scanned_at_once_share_one_epoll_set() -> None:
    hosts = [f"10.83.1.{i}" for i in range(1, 33)]

    async def scan_all() -> tuple[int, int, int, int, int, list[ScanResult]]:
        engine = ProbeEngine(4096)
        opts = ScanOptions(timeout=0.2, retries=0, concurrency=64)
        before = epoll_sets()
        tasks = [
            asyncio.create_task(scan_host(host, range(1, 301), opts, engine=engine))
            for host in hosts
        ]
        during, scanning = 0, 0
        while not all(task.done() for task in tasks):
            during = max(during, epoll_sets())
            scanning = max(scanning, engine.hosts)
            await asyncio.sleep(0.01)
        results = [await task for task in tasks]
        return before, during, epoll_sets(), scanning, engine.readiness_sets, results

    with fleet() as ns, listeners(ns, [22, 80], "10.83.1.7"):
        ns.iptables(
            "-A", "INPUT", "-d", "10.83.1.0/28", "-p", "tcp", "--syn", "--dport", "200:300",
            "-j", "DROP",
        )  # fmt: skip
        before, during, after, scanning, opened, results = ns.call(eventloop.run, scan_all())
    assert scanning == len(hosts)
    assert during == before + 1 and opened == 1  # one epoll set for all 32 hosts
    assert after == before  # and closed once the last scan ended
    for host, result in zip(hosts, results, strict=True):
        walled = int(host.rsplit(".", 1)[1]) < 16
        assert result.open == ((22, 80) if host == "10.83.1.7" else ())
        assert result.filtered == (tuple(range(200, 301)) if walled else ())
        assert len(result.closed) == 300 - len(result.filtered) - len(result.open)


@pytest.mark.parametrize(("linger", "readiness_sets"), [(0.0, 2), (0.5, 1)])
@requires_netns
def test_an_engine_keeps_its_sockets_between_scans_only_when_told_to_linger(
    linger: float, readiness_sets: int
) -> None:
    async def one_after_the_other() -> tuple[list[ScanResult], int, int, int, int]:
        before = len(os.listdir("/proc/self/fd"))
        engine = ProbeEngine(256, linger=linger)
        first = await scan_host("10.83.6.1", range(1, 201), engine=engine)
        kept = engine.spare_sockets
        second = await scan_host("10.83.6.2", range(1, 201), engine=engine)
        await asyncio.sleep(linger + 0.2)
        after = len(os.listdir("/proc/self/fd"))
        return [first, second], kept, engine.readiness_sets, before, after

    with fleet() as ns:
        results, kept, opened, before, after = ns.call(eventloop.run, one_after_the_other())
    assert all(len(result.closed) == 200 for result in results)
    assert opened == readiness_sets
    assert (kept > 0) == (linger > 0)  # the second host reused the first one's sockets
    assert after == before  # and everything was closed once the engine had lingered


@pytest.mark.parametrize(
    ("hosts", "concurrency", "max_probes"),
    [
        pytest.param(4, 10, 1000, id="each host's concurrency binds, not the window"),
        pytest.param(3, 25, 60, id="the global window binds: equal shares"),
        pytest.param(6, 64, 100, id="the global window binds: shares and a remainder"),
    ],
)
@requires_netns
def test_global_window_and_per_host_concurrency_hold_together(
    hosts: int, concurrency: int, max_probes: int
) -> None:
    addresses = [f"10.83.2.{i}" for i in range(1, hosts + 1)]

    async def scan_all() -> tuple[list[ScanResult], InFlight, int, int]:
        engine = ProbeEngine(max_probes)
        opts = ScanOptions(timeout=0.25, retries=0, concurrency=concurrency)
        with InFlight() as kernel:
            results = await asyncio.gather(
                *(scan_host(a, range(1, 41), opts, engine=engine) for a in addresses)
            )
        return list(results), kernel, engine.budget.peak_in_flight, engine.in_flight

    with fleet() as ns:
        ns.iptables("-A", "INPUT", "-d", "10.83.2.0/24", "-p", "tcp", "--syn", "-j", "DROP")
        results, kernel, engine_peak, left = ns.call(eventloop.run, scan_all())
    assert all(len(result.filtered) == 40 for result in results)
    assert left == 0
    # Never more than the global window in flight, as the kernel and the engine count it...
    assert kernel.peak_total <= max_probes and engine_peak <= max_probes
    # ...nor more than its concurrency to any one host, though all together exceed it.
    assert all(kernel.peak[a] <= concurrency for a in addresses)
    assert kernel.peak_total == engine_peak == min(max_probes, hosts * concurrency)
    assert kernel.peak_total > concurrency
    # Each host got its share of the window (or all its concurrency where that is less).
    share = min(concurrency, max_probes // hosts)
    assert all(kernel.peak[a] >= share for a in addresses)


@requires_netns
def test_a_firewalled_host_does_not_hold_back_a_reachable_one() -> None:
    async def both() -> list[ScanResult]:
        engine = ProbeEngine(64)
        opts = ScanOptions(timeout=0.2, retries=0, concurrency=64)
        return list(
            await asyncio.gather(
                scan_host("10.83.3.1", range(1, 1001), opts, engine=engine),
                scan_host("10.83.3.2", range(1, 3001), opts, engine=engine),
            )
        )

    with fleet() as ns, listeners(ns, [22, 2222], "10.83.3.2"):
        ns.iptables("-A", "INPUT", "-d", "10.83.3.1", "-p", "tcp", "--syn", "-j", "DROP")
        walled, reachable = ns.call(eventloop.run, both())
    assert len(walled.filtered) == 1000 and not walled.answered
    assert reachable.open == (22, 2222) and len(reachable.closed) == 2998
    # 1,000 dropped ports hold 32-64 slots for 0.2 s at a time: about 3 s; the reachable
    # host's 3,000 answers need its half of the window for a moment.
    assert reachable.duration_seconds < walled.duration_seconds / 5


@requires_netns
def test_cancelling_one_host_returns_its_slots_and_leaves_the_other_running() -> None:
    doomed, survivor = "10.83.4.1", "10.83.4.2"

    async def cancel_one() -> dict[str, Any]:
        seen: dict[str, Any] = {"fds": len(os.listdir("/proc/self/fd"))}
        engine = ProbeEngine(64)
        opts = ScanOptions(timeout=0.6, retries=0, concurrency=64)
        with InFlight() as kernel:
            doomed_scan = asyncio.create_task(
                scan_host(doomed, range(1, 2001), opts, engine=engine)
            )
            surviving_scan = asyncio.create_task(
                scan_host(survivor, range(1, 301), opts, engine=engine)
            )
            await asyncio.sleep(0.2)  # both hold their first probes until 0.6 s
            seen["shares"] = kernel.sample()
            doomed_scan.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed_scan
            seen["cancelled"] = kernel.sample()
            seen["engine_after_cancel"] = (engine.hosts, engine.in_flight)
            await asyncio.sleep(0.05)
            seen["taken_over"] = kernel.sample()
            seen["engine_taken_over"] = engine.in_flight
            seen["result"] = await surviving_scan
        seen["fds_after"] = len(os.listdir("/proc/self/fd"))
        return seen

    with fleet() as ns, listeners(ns, [22, 40], survivor):
        ns.iptables("-A", "INPUT", "-d", doomed, "-p", "tcp", "--syn", "-j", "DROP")
        ns.iptables(
            "-A", "INPUT", "-d", survivor, "-p", "tcp", "--syn", "--dport", "50:300", "-j", "DROP"
        )
        seen = ns.call(eventloop.run, cancel_one())
    # Started together, the two hosts split the window.
    assert seen["shares"][doomed] == seen["shares"][survivor] == 32
    # Cancelled: its sockets are closed at once and its slots returned (every slot held is
    # the other host's)...
    assert seen["cancelled"][doomed] == 0
    assert seen["engine_after_cancel"] == (1, seen["cancelled"][survivor])
    # ...and the other host takes them up.
    assert seen["taken_over"][survivor] == seen["engine_taken_over"] == 64
    result: ScanResult = seen["result"]
    assert result.open == (22, 40)
    assert result.filtered == tuple(range(50, 301))
    assert len(result.closed) == 49 - 2
    assert seen["fds_after"] == seen["fds"]


# -- IP literals need no resolver -------------------------------------------------------------


@pytest.mark.parametrize(
    "literal",
    ["10.83.0.1", "::1", "2001:DB8::0001", "::ffff:10.83.0.1", "fe80::1%1", "fe80::1%lo",
     "ff02::1%lo", "2001:db8::1%7"],
)  # fmt: skip
async def test_an_ip_literal_is_parsed_without_the_resolver(
    literal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_resolver(*args: object, **kwargs: object) -> Any:
        raise AssertionError(f"resolver asked for {args[0]!r}")

    expected = socket.getaddrinfo(literal, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", no_resolver)
    # The same answer getaddrinfo gives, address spelling and scope id included.
    assert await resolve(literal) == (expected[0][0], expected[0][4])


@pytest.mark.parametrize(
    "host", ["localhost", "127.1", "01.2.3.4", "::1%lo", "fe80::1%no-such-if", "[::1]"]
)
async def test_names_and_odd_spellings_go_to_the_resolver(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    asked: list[str] = []
    real = loop.getaddrinfo

    async def counting(name: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(name)
        return await real(name, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    with contextlib.suppress(socket.gaierror):
        await resolve(host)
    assert asked == [host]


@requires_netns
def test_a_scan_of_an_ip_literal_never_asks_the_resolver() -> None:
    async def scan_without_resolver() -> ScanResult:
        async def no_resolver(*args: object, **kwargs: object) -> Any:
            raise AssertionError(f"resolver asked for {args[0]!r}")

        asyncio.get_running_loop().getaddrinfo = no_resolver  # type: ignore[method-assign]
        return await scan_host("10.83.5.1", [22, 23, 80])

    with fleet() as ns, listeners(ns, [22, 80], "10.83.5.1"):
        result = ns.call(asyncio.run, scan_without_resolver())
    assert result.open == (22, 80) and result.closed == (23,)
    assert result.address == "10.83.5.1"


# -- the daemon's pipeline ---------------------------------------------------------------------


def test_a_rebuilt_pipeline_keeps_its_scanner_while_its_limits_are_unchanged() -> None:
    def config(max_probes: int, processes: int = 1) -> Any:
        text = (
            f"scan:\n  max_probes: {max_probes}\n  processes: {processes}\n"
            "fingerprint:\n  enabled: false\ntargets:\n  - host: 10.83.0.1\n"
        )
        return parse_config(text, "scanner-test.yaml")

    first = build_scan_pipeline(config(512), None)
    assert isinstance(first.scanner, InProcessScanner) and first.scanner.max_probes == 512
    assert build_scan_pipeline(config(512), first).scanner is first.scanner
    changed = build_scan_pipeline(config(256), first)
    assert changed.scanner is not first.scanner and changed.scanner.max_probes == 256
    spread = build_scan_pipeline(config(256, processes=2), changed)
    assert isinstance(spread.scanner, ScannerProcesses) and spread.scanner.count == 2
    assert build_scan_pipeline(config(256, processes=2), spread).scanner is spread.scanner


@requires_netns
def test_spare_sockets_of_ipv4_mapped_targets_are_not_reused_for_ipv6_ones() -> None:
    """A socket that tried a v4-mapped address keeps IPv4 internals: reused for a native IPv6
    address it would never connect, and every probe would go unanswered."""

    async def one_after_the_other() -> tuple[ScanResult, ScanResult, int]:
        engine = ProbeEngine(256)
        # A host that answers nothing keeps the engine, and so its spare sockets, alive.
        keeper = asyncio.create_task(
            scan_host("127.0.0.2", [1], ScanOptions(timeout=3, retries=0), engine=engine)
        )
        mapped = await scan_host("::ffff:127.0.0.1", range(1, 301), engine=engine)
        spares = engine.spare_sockets
        # No retries: a probe lost to a broken socket would show as filtered.
        native = await scan_host("::1", range(1, 301), ScanOptions(retries=0), engine=engine)
        keeper.cancel()
        return mapped, native, spares

    with (
        NetNS(PREFIX) as ns,
        listeners(ns, [80]),
        listeners(ns, [22, 222], "::1", socket.AF_INET6),
    ):
        ns.iptables("-A", "INPUT", "-d", "127.0.0.2", "-j", "DROP")
        mapped, native, spares = ns.call(eventloop.run, one_after_the_other())
    assert spares > 0  # the mapped scan left sockets for reuse
    assert mapped.open == (80,) and len(mapped.closed) == 299 and mapped.filtered == ()
    assert native.open == (22, 222) and len(native.closed) == 298 and native.filtered == ()
