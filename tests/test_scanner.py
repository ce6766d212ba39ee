"""The connect scanner against real sockets in network namespaces with real firewalls."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

import pytest

from exporter import eventloop
from exporter.model import PortState, ScanResult
from exporter.scanner import ProbeBudget, ScanOptions, raise_fd_limit, scan_host
from exporter.scanner.timing import RttEstimator
from tests.lab import NetNS, listeners, requires_netns

OPEN = [22, 80, 443, 8080, 31337, 50001]


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


def test_budget_hands_freed_slots_round_robin() -> None:
    budget = ProbeBudget(2)
    assert budget.try_acquire() and budget.try_acquire()
    assert not budget.try_acquire()
    granted: list[str] = []
    wants = {"a": 2, "b": 1}

    def waiter(name: str) -> Callable[[], bool]:
        def grant() -> bool:
            granted.append(name)
            wants[name] -= 1
            return wants[name] > 0

        return grant

    budget.wait(waiter("a"))
    budget.wait(waiter("b"))
    assert not budget.try_acquire()  # no barging past the waiters
    for _ in range(4):
        budget.release()
    # a, then b, then a again (it wanted two); the fourth slot goes back to the pool.
    assert granted == ["a", "b", "a"]
    assert budget.in_use == 1


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
    with NetNS() as ns, listeners(ns, OPEN):
        result = scan_in(ns, "127.0.0.1", range(1, 65536), concurrency=1024)
    assert result.open == tuple(OPEN)
    assert len(result.closed) == 65535 - len(OPEN)
    assert result.filtered == ()
    assert result.ports_scanned == 65535


@requires_netns
def test_self_connect_is_not_an_open_port() -> None:
    """With a ten-port ephemeral range, probes to those ports often connect to themselves."""
    with NetNS() as ns:
        ns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40009")
        for _ in range(20):
            result = scan_in(ns, "127.0.0.1", range(40000, 40010), concurrency=1)
            assert result.open == ()
            assert len(result.closed) == 10


@requires_netns
def test_firewall_drop_reject_and_icmp() -> None:
    with NetNS() as ns, listeners(ns, OPEN):
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
    with NetNS() as ns, listeners(ns, OPEN):
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
    with NetNS() as ns, listeners(ns, OPEN):
        ns.iptables("-A", "INPUT", "-d", "127.0.0.2", "-j", "DROP")
        result = scan_in(ns, "127.0.0.2", OPEN + list(range(100, 200)), timeout=0.3)
    assert not result.answered and not result.ok
    assert result.open == () and result.closed == ()
    assert len(result.filtered) == len(OPEN) + 100


@requires_netns
def test_ipv6_loopback() -> None:
    with NetNS() as ns, listeners(ns, [22, 8443], "::1", socket.AF_INET6):
        result = scan_in(ns, "::1", range(1, 10001))
    assert result.address == "::1"
    assert result.open == (22, 8443)
    assert len(result.closed) == 10000 - 2


@requires_netns
def test_dns_name_is_resolved_at_scan_time() -> None:
    with NetNS() as ns, listeners(ns, [8080]):
        result = scan_in(ns, "localhost", [8080, 8081])
    assert result.host == "localhost"
    assert result.address in ("127.0.0.1", "::1")
    if result.address == "127.0.0.1":
        assert result.open == (8080,)


@requires_netns
def test_shared_budget_does_not_starve_a_small_host() -> None:
    """A small host started after a big one finishes long before the big one."""

    async def both() -> tuple[ScanResult, ScanResult, float]:
        budget = ProbeBudget(64)
        opts = ScanOptions(timeout=0.2, retries=0, concurrency=64)
        big = asyncio.create_task(scan_host("127.0.0.2", range(1, 1001), opts, budget=budget))
        # The small host starts once the big one holds every probe of the shared budget.
        for _ in range(100_000):
            if budget.in_use >= budget.limit:
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError("the big scan never took the whole budget")
        small = await scan_host("127.0.0.3", range(1, 101), opts, budget=budget)
        small_done = time.monotonic()
        big_result = await big
        return big_result, small, time.monotonic() - small_done

    with NetNS() as ns:
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

    with NetNS() as ns:
        ns.iptables("-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP")
        before, during, after = ns.call(eventloop.run, cancel_midway())
    assert during > before + 50  # probes were in flight
    assert after == before


@requires_netns
def test_rate_limit_paces_probes() -> None:
    with NetNS() as ns:
        started = time.monotonic()
        result = scan_in(ns, "127.0.0.1", range(1, 201), rate=400.0)
        elapsed = time.monotonic() - started
    assert len(result.closed) == 200
    assert elapsed >= 0.4  # 200 probes at 400/s cannot take less than half a second


@requires_netns
def test_address_that_can_never_be_probed_fails_the_scan_quickly() -> None:
    """connect() to ::1 with IPv6 disabled says EADDRNOTAVAIL forever: no endless retry."""
    with NetNS() as ns:
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        ns.run("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1")
        started = time.monotonic()
        result = scan_in(ns, "::1", range(1, 11))
        elapsed = time.monotonic() - started
    assert not result.ok and not result.answered
    assert result.error is not None and "::1" in result.error
    assert elapsed < 10
