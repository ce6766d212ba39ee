"""Scanner processes: the daemon's host scans spread over child processes.

Real sockets in a lab namespace, real child processes: the results must be the in-process
scanner's, a child that dies must fail its scans (never report ports), a cancelled scan must
stop probing, and no child may outlive the daemon, whatever way the daemon ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from exporter import eventloop
from exporter.model import ScanResult
from exporter.scanner import ScanOptions
from exporter.scanner.processes import (
    InProcessScanner,
    ScannerLost,
    ScannerProcesses,
    scanner_processes,
    usable_cpus,
)
from tests.lab import NetNS, listeners, requires_netns

PREFIX = "pssp"  # the namespaces of this module
FLEET = "10.84.0.0/16"
OPEN = [22, 80, 443, 8080]
PORTS = [*range(1, 1025), 8080]
REPO = Path(__file__).resolve().parent.parent


def fleet() -> NetNS:
    ns = NetNS(PREFIX).__enter__()
    ns.run("ip", "route", "add", "local", FLEET, "dev", "lo")
    return ns


def drop_everything_to(ns: NetNS, address: str) -> None:
    ns.iptables("-A", "OUTPUT", "-d", address, "-p", "tcp", "--syn", "-j", "DROP")


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found.extend(int(child) for child in task.read_text().split())
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait a while for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_processes_default_to_the_usable_cpus_at_most_eight() -> None:
    assert scanner_processes(3) == 3
    assert scanner_processes(0) == min(usable_cpus(), 8)
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


@requires_netns
def test_scans_in_scanner_processes_find_what_the_in_process_scanner_finds() -> None:
    hosts = [f"10.84.0.{i}" for i in range(1, 9)]

    async def both() -> tuple[list[ScanResult], list[ScanResult], int]:
        spread = ScannerProcesses(2, 512)
        here = InProcessScanner(512)
        try:
            remote = await asyncio.gather(*(spread.scan(h, PORTS, ScanOptions()) for h in hosts))
            pids = {s.process.pid for s in spread._scanners}
            local = await asyncio.gather(*(here.scan(h, PORTS, ScanOptions()) for h in hosts))
        finally:
            await spread.aclose()
        return remote, local, len(pids)

    ns = fleet()
    try:
        with listeners(ns, OPEN, "10.84.0.3"), listeners(ns, [22], "10.84.0.7"):
            remote, local, processes = ns.call(eventloop.run, both())
    finally:
        ns.__exit__(None, None, None)
    assert processes == 2
    for far, near in zip(remote, local, strict=True):
        assert (far.host, far.open, far.closed, far.filtered) == (
            near.host,
            near.open,
            near.closed,
            near.filtered,
        )
        assert far.ok and far.ports_scanned == len(PORTS)
    assert remote[2].open == tuple(OPEN) and remote[6].open == (22,)
    assert sum(len(r.closed) for r in remote) == 8 * len(PORTS) - len(OPEN) - 1


@requires_netns
def test_a_scanner_process_that_dies_fails_its_scans_and_is_replaced() -> None:
    async def story() -> tuple[str, ScanResult, int, int]:
        scanners = ScannerProcesses(1, 256)
        try:
            # A dropped host keeps the scan in flight (5 s timeout) while its process dies.
            slow = asyncio.create_task(
                scanners.scan("10.84.1.1", range(1, 200), ScanOptions(timeout=5.0))
            )
            await asyncio.sleep(0.5)
            first = scanners._scanners[0].process.pid
            os.kill(first, signal.SIGKILL)
            try:
                await asyncio.wait_for(slow, 5)
                lost = "no error"
            except ScannerLost as exc:
                lost = str(exc)
            after = await scanners.scan("10.84.1.2", [22, 23], ScanOptions())
            second = scanners._scanners[0].process.pid
        finally:
            await scanners.aclose()
        return lost, after, first, second

    ns = fleet()
    try:
        drop_everything_to(ns, "10.84.1.1")
        with listeners(ns, [22], "10.84.1.2"):
            lost, after, first, second = ns.call(eventloop.run, story())
    finally:
        ns.__exit__(None, None, None)
    assert lost == f"scanner process {first} killed by signal 9 during the scan"
    assert second != first
    assert after.open == (22,) and after.closed == (23,)


@requires_netns
def test_a_cancelled_scan_stops_probing_in_its_process() -> None:
    async def story() -> tuple[int, int, float]:
        scanners = ScannerProcesses(1, 256)
        try:
            task = asyncio.create_task(
                scanners.scan("10.84.2.1", range(1, 60000), ScanOptions(timeout=5.0))
            )
            await asyncio.sleep(0.5)
            pid = scanners._scanners[0].process.pid
            during = sockets_of(pid)
            task.cancel()
            started = time.monotonic()
            for _ in range(100):  # 5 s at most
                if sockets_of(pid) < during - 32:
                    break
                await asyncio.sleep(0.05)
            return during, sockets_of(pid), time.monotonic() - started
        finally:
            await scanners.aclose()

    ns = fleet()
    try:
        drop_everything_to(ns, "10.84.2.1")
        during, after, seconds = ns.call(eventloop.run, story())
    finally:
        ns.__exit__(None, None, None)
    assert during >= 64  # the first window of unanswered probes
    assert after <= during - 64 and seconds < 2


def sockets_of(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


DAEMON = """
import asyncio, sys
from exporter.scanner import ScanOptions
from exporter.scanner.processes import ScannerProcesses

async def main() -> None:
    scanners = ScannerProcesses(2, 512)
    scans = [
        asyncio.create_task(scanners.scan(h, range(1, 60000), ScanOptions(timeout=5.0)))
        for h in ("10.84.3.1", "10.84.3.2")
    ]
    await asyncio.sleep(0.5)
    print(" ".join(str(s.process.pid) for s in scanners._scanners), flush=True)
    await asyncio.gather(*scans)

asyncio.run(main())
"""


@requires_netns
@pytest.mark.parametrize("ending", [signal.SIGKILL, signal.SIGTERM])
def test_no_scanner_process_outlives_the_daemon(ending: signal.Signals) -> None:
    """The daemon killed mid-scan (kill -9 included): its scanner processes see their pipe
    close and exit, instead of probing on as orphans."""
    ns = fleet()
    try:
        drop_everything_to(ns, "10.84.3.0/24")
        daemon = ns.spawn(
            sys.executable,
            "-c",
            textwrap.dedent(DAEMON),
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        assert daemon.stdout is not None
        pids = [int(p) for p in daemon.stdout.readline().split()]
        assert len(pids) == 2 and all(running(p) for p in pids)
        # `ip netns exec` execs the command: the pid is the daemon's own.
        assert set(children_of(daemon.pid)) == set(pids)
        os.kill(daemon.pid, ending)
        deadline = time.monotonic() + 5
        while any(running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(running(p) for p in pids)
    finally:
        ns.__exit__(None, None, None)


@requires_netns
def test_a_retired_scanner_finishes_its_scans_then_closes() -> None:
    async def story() -> tuple[ScanResult, bool, str]:
        scanners = ScannerProcesses(2, 256)
        scan = asyncio.create_task(scanners.scan("10.84.4.1", [22, 23, 24], ScanOptions()))
        await asyncio.sleep(0)  # the scan is handed out before the reload retires it
        await asyncio.sleep(0.2)
        pids = [s.process.pid for s in scanners._scanners]
        await scanners.retire()
        result = await scan
        try:
            await scanners.scan("10.84.4.1", [22], ScanOptions())
            refused = "accepted"
        except ScannerLost as exc:
            refused = str(exc)
        return result, any(running(p) for p in pids), refused

    ns = fleet()
    try:
        with listeners(ns, [22], "10.84.4.1"):
            result, still_running, refused = ns.call(eventloop.run, story())
    finally:
        ns.__exit__(None, None, None)
    assert result.open == (22,) and result.closed == (23, 24)
    assert not still_running
    assert refused == "the scanner processes are shut down"
