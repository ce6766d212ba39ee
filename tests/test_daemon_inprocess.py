"""The daemon in-process, with a fake scan step and a clock the test moves by hand.

No root, no sockets scanned: what is tested is the daemon's own logic (when hosts are scanned,
confirmations brought forward, reloads, the store refusing a stale write, shutdown) against
the real state machine and a real SQLite store in a temporary directory. Time moves only when
a test says so, so "an hour later" takes no time and no assertion depends on the machine's
speed. The end-to-end tests with real scans in namespaces are in test_daemon.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sqlite3
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from exporter.commands.run import serve
from exporter.config import Config, HostSpec, load_config
from exporter.daemon.pipeline import ScanFn
from exporter.daemon.runner import POLL_STORE_SECONDS, Daemon, StoreLostError
from exporter.daemon.schedule import FIRST_SCAN_SPREAD_SECONDS
from exporter.daemon.snapshot import HostView
from exporter.model import HostScan, ScanResult
from exporter.state import EventKind, Transition
from exporter.store import Store, StoreInUseError
from exporter.web.app import build_app
from exporter.web.metrics import SnapshotExposition

T0 = 1_800_000_000.0
HOUR = 3600.0
# Real time the tests allow the daemon to settle after each move of the fake clock.
SETTLE_SECONDS = 10.0

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    """Wall-clock time that moves only by `advance`; waits return when it passes them."""

    def __init__(self, start: float = T0) -> None:
        self._now = start
        self._moved = asyncio.Event()
        self.waits = 0  # how often the daemon went to sleep
        self._sleeping_on: asyncio.Event | None = None
        # Bumped by each move of the time; `_seen` is the move the sleeper last looked at.
        self._version = 0
        self._seen = 0

    def now(self) -> float:
        return self._now

    async def wait(self, wake: asyncio.Event, deadline: float) -> None:
        self.waits += 1
        await asyncio.sleep(0)  # a loop that never really sleeps shows as many waits, not a hang
        self._sleeping_on = wake
        woken = asyncio.ensure_future(wake.wait())
        try:
            while True:
                self._seen = self._version
                if wake.is_set() or self._now >= deadline:
                    break
                moved = asyncio.ensure_future(self._moved.wait())
                await asyncio.wait({woken, moved}, return_when=asyncio.FIRST_COMPLETED)
                moved.cancel()
        finally:
            woken.cancel()
            self._sleeping_on = None

    @property
    def sleeping(self) -> bool:
        """The daemon sleeps, and has looked at the time since it last moved."""
        return (
            self._sleeping_on is not None
            and not self._sleeping_on.is_set()
            and self._seen == self._version
        )

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._version += 1
        self._moved.set()
        self._moved = asyncio.Event()


@dataclass
class FakeScan:
    """The scan step: each host shows the open ports the test set, at the clock's time.

    A host in `held` blocks in its scan until the test releases it, as a slow scan does.
    """

    clock: FakeClock
    open_ports: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dropped: dict[str, tuple[int, ...]] = field(default_factory=dict)  # no answer: filtered
    calls: list[tuple[str, float]] = field(default_factory=list)
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)

    async def __call__(self, spec: HostSpec) -> HostScan:
        started = self.clock.now()
        self.calls.append((spec.host, started))
        gate = self.held.get(spec.host)
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(spec.host)
                raise
        opened = self.open_ports.get(spec.host, ())
        dropped = self.dropped.get(spec.host, ())
        result = ScanResult(
            host=spec.host,
            address=spec.host,
            started=started,
            duration_seconds=0.5,
            ports_scanned=len(spec.ports),
            answered=True,
            open=tuple(p for p in spec.ports if p in opened),
            closed=tuple(p for p in spec.ports if p not in opened and p not in dropped),
            filtered=tuple(p for p in spec.ports if p in dropped),
            probes_sent=len(spec.ports),
        )
        return HostScan(scan=result, services={})

    def hosts_scanned(self) -> list[str]:
        return [host for host, _ in self.calls]

    def hold(self, host: str) -> asyncio.Event:
        self.held[host] = asyncio.Event()
        return self.held[host]


def write_config(path: Path, hosts: Iterable[str], *, state: Path, extra: str = "") -> Path:
    targets = "".join(f"  - {host}\n" for host in hosts)
    path.write_text(
        textwrap.dedent(
            f"""\
            defaults:
              ports: [22, 80, 443]
              interval: 1h
              confirm_after: 5m
              confirmations: 2
            fingerprint:
              enabled: false
            storage:
              path: {state}
            """
        )
        + extra
        + "targets:\n"
        + targets
    )
    return path


@dataclass
class Running:
    daemon: Daemon
    clock: FakeClock
    scan: FakeScan
    config_path: Path
    state_path: Path

    async def settle(self, busy: Iterable[str] = ()) -> None:
        """Wait (real time, bounded) until the daemon sleeps with no scan running except the
        ones the test holds."""
        allowed = set(busy)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_SECONDS
        while loop.time() < deadline:
            scanning = {view.host for view in self.daemon.snapshot.hosts if view.scanning}
            if self.clock.sleeping and scanning <= allowed:
                # One more turn: a finished scan may still be on its way to the snapshot.
                await asyncio.sleep(0.01)
                if self.clock.sleeping:
                    return
            await asyncio.sleep(0.005)
        raise AssertionError("the daemon did not settle")

    async def advance(self, seconds: float, busy: Iterable[str] = ()) -> None:
        self.clock.advance(seconds)
        await self.settle(busy)

    async def advance_to(self, when: float, busy: Iterable[str] = ()) -> None:
        await self.advance(max(0.0, when - self.clock.now()), busy)

    def view(self, host: str) -> HostView:
        view = self.daemon.snapshot.host(host)
        assert view is not None, f"{host} is not exported"
        return view

    def next_scan(self, host: str) -> float:
        due = self.view(host).next_scan
        assert due is not None
        return due


def build_with(scan: ScanFn) -> Callable[[Config, ScanFn | None], ScanFn]:
    return lambda _config, _running: scan


@contextlib.asynccontextmanager
async def running_daemon(
    tmp_path: Path,
    hosts: Iterable[str],
    *,
    extra: str = "",
    seed: int = 1,
    hold: Iterable[str] = (),
) -> AsyncIterator[Running]:
    """The daemon started on a fresh store; scans of the hosts in `hold` block from the
    start until the test releases them."""
    state = tmp_path / "state.sqlite"
    config_path = write_config(tmp_path / "config.yaml", hosts, state=state, extra=extra)
    clock = FakeClock()
    scan = FakeScan(clock)
    for host in hold:
        scan.hold(host)
    daemon = Daemon(
        load_config(config_path), build_scan=build_with(scan), clock=clock, rng=random.Random(seed)
    )
    await daemon.startup()
    loop_task = asyncio.create_task(daemon.main_loop())
    run = Running(daemon, clock, scan, config_path, state)
    try:
        await run.settle(busy=scan.held)
        yield run
    finally:
        for gate in scan.held.values():
            gate.set()
        daemon.stop()
        await asyncio.wait_for(loop_task, timeout=SETTLE_SECONDS)
        await daemon.shutdown(grace=SETTLE_SECONDS)


HOSTS = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]


async def test_first_scans_are_spread_then_each_host_every_interval_with_jitter(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, HOSTS) as run:
        firsts = {host: run.next_scan(host) for host in HOSTS}
        assert all(T0 <= due <= T0 + FIRST_SCAN_SPREAD_SECONDS for due in firsts.values())
        assert len(set(firsts.values())) == len(HOSTS), "first scans start together"
        assert run.scan.calls == []

        # Each host is scanned when its own due time comes, not before.
        for host, due in sorted(firsts.items(), key=lambda item: item[1]):
            await run.advance_to(due - 0.01)
            assert host not in run.scan.hosts_scanned()
            await run.advance_to(due)
            assert run.scan.hosts_scanned()[-1] == host
        assert sorted(run.scan.hosts_scanned()) == sorted(HOSTS)

        # Then every interval, moved by at most half the 10% jitter span, and not in step.
        seconds = {host: run.next_scan(host) - when for host, when in run.scan.calls}
        assert all(HOUR - 180 <= s <= HOUR + 180 for s in seconds.values()), seconds
        assert len(set(seconds.values())) == len(HOSTS), "jitter moved no host"
        await run.advance(HOUR + 180)
        assert sorted(run.scan.hosts_scanned()) == sorted(HOSTS * 2)


async def test_a_change_seen_once_is_confirmed_confirm_after_later(tmp_path: Path) -> None:
    host = HOSTS[0]
    async with running_daemon(tmp_path, [host]) as run:
        run.scan.open_ports[host] = (22,)
        await run.advance(FIRST_SCAN_SPREAD_SECONDS)
        assert run.view(host).state.baseline == {22: None}

        run.scan.open_ports[host] = (22, 443)
        await run.advance_to(run.next_scan(host))
        seen_at = run.scan.calls[-1][1]
        assert 443 in run.view(host).state.pending
        assert run.next_scan(host) == seen_at + 300, "the confirming scan is not 5m later"
        assert not run.view(host).state.in_force

        await run.advance(300)
        state = run.view(host).state
        assert state.in_force[443].kind is EventKind.PORT_NEW_OPEN
        assert not state.pending
        # Confirmed: back to the normal interval.
        assert run.next_scan(host) - run.scan.calls[-1][1] >= HOUR - 180


async def test_hosts_waiting_for_a_scan_slot_do_not_spin_the_loop(tmp_path: Path) -> None:
    extra = "scan:\n  max_concurrent_hosts: 1\n  jitter: 0s\n"
    async with running_daemon(tmp_path, HOSTS[:3], extra=extra, hold=HOSTS[:3]) as run:
        first = HOSTS[0]
        gates = run.scan.held
        assert run.scan.hosts_scanned() == [first]
        sleeps = run.clock.waits
        for _ in range(100):  # the loop gets every chance to spin
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        assert run.clock.waits == sleeps, "the loop woke with every slot taken"
        assert [view.host for view in run.daemon.snapshot.hosts if view.scanning] == [first]

        gates[first].set()  # a slot frees: exactly the next host starts
        await run.settle(busy=[HOSTS[1]])
        assert run.scan.hosts_scanned() == HOSTS[:2]
        gates[HOSTS[1]].set()
        gates[HOSTS[2]].set()
        await run.settle()
        assert run.scan.hosts_scanned() == HOSTS[:3]


async def test_reload_adds_and_removes_targets(tmp_path: Path) -> None:
    kept, removed, added = HOSTS[0], HOSTS[1], HOSTS[2]
    async with running_daemon(tmp_path, [kept, removed]) as run:
        await run.advance(FIRST_SCAN_SPREAD_SECONDS)
        kept_due = run.next_scan(kept)
        gate = run.scan.hold(removed)
        await run.advance_to(run.next_scan(removed), busy=[removed])
        assert run.view(removed).scanning

        write_config(run.config_path, [kept, added], state=run.state_path)
        result = await run.daemon.reload()
        assert result.successful, result.error
        await run.settle()
        assert [view.host for view in run.daemon.snapshot.hosts] == [kept, added]
        assert {host for host, _ in run.daemon.snapshot.scans_total} == {kept}
        assert run.scan.cancelled == [removed], "the removed host's scan went on"
        assert not gate.is_set()
        assert run.next_scan(kept) == kept_due, "a reload moved a kept host's schedule"
        assert run.clock.now() <= run.next_scan(added) <= run.clock.now() + 10

        await run.advance(2 * HOUR)
        scanned_after = run.scan.hosts_scanned()[3:]
        assert removed not in scanned_after
        assert added in scanned_after and kept in scanned_after
        # The removed host's history stays in the store, and it is no longer exported.
        store = Store.open(run.state_path)
        try:
            assert removed in store.hosts()
        finally:
            store.close()

        # A broken file keeps everything running as it was.
        run.config_path.write_text("targets: [\n")
        failed = await run.daemon.reload()
        assert not failed.successful and failed.error and "config.yaml" in failed.error
        assert [view.host for view in run.daemon.snapshot.hosts] == [kept, added]
        assert run.daemon.snapshot.reload.successful is False


async def test_a_write_by_another_process_during_a_scan_is_folded_in(tmp_path: Path) -> None:
    """`baseline accept` writes the host while its scan runs: the daemon's write is refused
    as stale and the scan is stepped again from the state the store now holds."""
    host = HOSTS[0]
    async with running_daemon(tmp_path, [host]) as run:
        run.scan.open_ports[host] = (22,)
        await run.advance(FIRST_SCAN_SPREAD_SECONDS)
        run.scan.open_ports[host] = (22, 80)
        await run.advance_to(run.next_scan(host))
        await run.advance(300)
        assert 80 in run.view(host).state.in_force

        gate = run.scan.hold(host)
        await run.advance_to(run.next_scan(host), busy=[host])
        other = Store.open(run.state_path)
        try:
            accepted = other.accept(host, None, now=run.clock.now())
        finally:
            other.close()
        assert set(accepted.baseline) == {22, 80}
        gate.set()
        await run.settle()

        state = run.view(host).state
        assert set(state.baseline) == {22, 80}, "the accepted baseline was overwritten"
        assert not state.in_force and not state.pending
        store = Store.open(run.state_path)
        try:
            assert store.load_state(host) == state
            history = store.history(host, 0)
        finally:
            store.close()
        assert len(history.scans) == 4, "the refused scan was not recorded after the retry"
        assert run.daemon.snapshot.scans_total[(host, "success")] == 4


async def test_shutdown_while_scans_run_cancels_them_and_writes_nothing(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, HOSTS[:2]) as run:
        for host in HOSTS[:2]:
            run.scan.hold(host)
        await run.advance(FIRST_SCAN_SPREAD_SECONDS, busy=HOSTS[:2])
        assert {view.host for view in run.daemon.snapshot.hosts if view.scanning} == set(HOSTS[:2])
        run.scan.held.clear()  # leave them hanging: shutdown must not wait for them
        run.daemon.stop()
        await run.daemon.shutdown(grace=SETTLE_SECONDS)
        assert sorted(run.scan.cancelled) == sorted(HOSTS[:2])
    store = Store.open(run.state_path)
    try:
        assert all(not store.history(host, 0).scans for host in HOSTS[:2])
    finally:
        store.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_http_answers_before_a_slow_start_up_and_ready_follows_it(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    config = load_config(write_config(tmp_path / "config.yaml", HOSTS[:1], state=state))
    clock = FakeClock()
    scan = FakeScan(clock)
    building = threading.Event()
    release = threading.Event()

    def slow_build(_config: Config, _running: ScanFn | None) -> ScanFn:
        building.set()
        release.wait(SETTLE_SECONDS)  # a large signature file being read
        return scan

    unhandled: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda signum, _frame: unhandled.append(signum))
    daemon = Daemon(config, build_scan=slow_build, clock=clock)
    app = build_app(daemon, SnapshotExposition(lambda: daemon.snapshot, None))
    address = f"127.0.0.1:{_free_port()}"
    serving = asyncio.create_task(serve(daemon, app, address, None))
    base = f"http://{address}"
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.to_thread(building.wait, SETTLE_SECONDS)
            async with session.get(f"{base}/-/healthy") as healthy:
                assert healthy.status == 200
            async with session.get(f"{base}/-/ready") as ready:
                assert ready.status == 503
                assert "Not ready" in await ready.text()
            async with session.get(f"{base}/") as page:
                assert "Starting: the stored state is not loaded yet" in await page.text()
            async with session.get(f"{base}/metrics") as metrics:
                # Not "no hosts": a failed scrape, so Prometheus holds the last state (up 0).
                assert metrics.status == 503
            async with session.post(f"{base}/-/reload") as reload:
                assert reload.status == 500 and "still starting" in await reload.text()
            # SIGHUP's default action would end the process: the daemon handles it from the
            # start (the fallback handler below only catches it if the daemon does not).
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.05)
            assert unhandled == [], "SIGHUP during start-up was not the daemon's"

            release.set()
            for _ in range(500):  # 10 s at most
                async with session.get(f"{base}/-/ready") as ready:
                    if ready.status == 200:
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("never ready after start-up")
            assert daemon.snapshot.host(HOSTS[0]) is not None
    finally:
        release.set()
        daemon.stop()
        code = await asyncio.wait_for(serving, timeout=SETTLE_SECONDS)
        signal.signal(signal.SIGHUP, previous)
        assert code == 0


async def test_every_series_carries_the_vantage_and_dropped_ports_show_as_filtered(
    tmp_path: Path,
) -> None:
    host = HOSTS[0]
    async with running_daemon(tmp_path, [host], extra="vantage: outside\n") as run:
        exposition = SnapshotExposition(lambda: run.daemon.snapshot, None)
        run.scan.open_ports[host] = (22, 80)
        await run.advance(FIRST_SCAN_SPREAD_SECONDS)
        run.scan.open_ports[host] = (22,)
        run.scan.dropped[host] = (80,)  # a firewall now drops 80 instead of a RST
        await run.advance_to(run.next_scan(host))
        body = exposition()[0].decode()

    samples = [line for line in body.splitlines() if line.startswith("portscan_")]
    assert samples
    assert [line for line in samples if 'vantage="outside"' not in line] == []
    assert (
        'portscan_port_filtered{host="192.0.2.1",port="80",protocol="tcp",vantage="outside"} 1'
        in samples
    )
    assert (
        'portscan_port_filtered{host="192.0.2.1",port="22",protocol="tcp",vantage="outside"} 0'
        in samples
    )
    assert 'portscan_build_info{version="' in body and 'vantage="outside"} 1' in body


async def test_a_restart_keeps_a_pending_confirmation_early(tmp_path: Path) -> None:
    host = HOSTS[0]
    async with running_daemon(tmp_path, [host]) as run:
        run.scan.open_ports[host] = (22,)
        await run.advance(FIRST_SCAN_SPREAD_SECONDS)
        run.scan.open_ports[host] = (22, 443)
        await run.advance_to(run.next_scan(host))
        assert 443 in run.view(host).state.pending
        now = run.clock.now()

    # Started again a minute later on the same store: the confirming scan stays 5m after
    # the sighting, not an interval (1h) after it.
    clock = FakeClock(now + 60)
    daemon = Daemon(load_config(run.config_path), build_scan=build_with(run.scan), clock=clock)
    await daemon.startup()
    try:
        view = daemon.snapshot.host(host)
        assert view is not None and view.state.last_scan is not None
        assert 443 in view.state.pending
        assert view.next_scan == view.state.last_scan.finished + 300
    finally:
        await daemon.shutdown()


async def test_any_failure_of_a_reload_keeps_the_running_config(tmp_path: Path) -> None:
    host = HOSTS[0]
    async with running_daemon(tmp_path, [host]) as run:
        calls = 0

        def broken_build(_config: Config, _running: ScanFn | None) -> ScanFn:
            nonlocal calls
            calls += 1
            raise RecursionError("maximum recursion depth exceeded\nwhile building")

        run.daemon._build_scan = broken_build  # the next reload meets an unexpected error
        write_config(run.config_path, [host, HOSTS[1]], state=run.state_path)
        result = await run.daemon.reload()
        assert calls == 1
        assert not result.successful
        assert result.error == "RecursionError: maximum recursion depth exceeded"
        assert run.daemon.snapshot.reload.successful is False
        assert [view.host for view in run.daemon.snapshot.hosts] == [host]


async def test_a_second_daemon_on_the_same_store_is_refused(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, HOSTS[:1]) as run:
        second = Daemon(
            load_config(run.config_path), build_scan=build_with(run.scan), clock=FakeClock()
        )
        with pytest.raises(StoreInUseError, match="in use by another portscan-exporter daemon"):
            await second.startup()


async def test_a_store_file_deleted_under_the_daemon_is_reported(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, HOSTS[:1]) as run:
        await run.advance(FIRST_SCAN_SPREAD_SECONDS)
        assert run.daemon.snapshot.store.last_write_ok
        run.state_path.unlink()
        await run.advance(POLL_STORE_SECONDS)  # the next look at the store
        store = run.daemon.snapshot.store
        assert not store.last_write_ok
        assert store.last_error is not None and "deleted or moved away" in store.last_error


async def test_a_lost_store_is_not_silently_relearned(tmp_path: Path) -> None:
    host = HOSTS[0]
    async with running_daemon(tmp_path, [host]) as run:
        run.scan.open_ports[host] = (22,)
        await run.advance(FIRST_SCAN_SPREAD_SECONDS)
        assert run.view(host).state.baseline == {22: None}
    for leftover in run.state_path.parent.glob(run.state_path.name + "*"):
        if not leftover.name.endswith(".lock"):
            leftover.unlink()  # the database is gone; the daemon's lock file stays

    config = load_config(run.config_path)
    refused = Daemon(config, build_scan=build_with(run.scan), clock=FakeClock())
    with pytest.raises(StoreLostError, match="the store is gone or empty, but a daemon ran"):
        await refused.startup()
    assert not run.state_path.exists(), "the refused start created a store"

    relearning = Daemon(config, build_scan=build_with(run.scan), clock=FakeClock(), relearn=True)
    await relearning.startup()
    try:
        assert relearning.snapshot.ready
        view = relearning.snapshot.host(host)
        assert view is not None and view.state.baseline_source is None  # learned anew
    finally:
        await relearning.shutdown()


async def test_scans_that_finish_together_share_a_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet's scans are written in groups, each still all or nothing: a full disk fails
    every scan of its group (none is published), and the next round records them all."""
    hosts = [f"198.51.100.{i}" for i in range(1, 61)]
    groups: list[int] = []
    full_disk = False
    record_scans = Store.record_scans

    def counting(store: Store, scans: Sequence[tuple[HostScan, Transition]]) -> list[object]:
        groups.append(len(scans))
        if full_disk:
            raise sqlite3.OperationalError("database or disk is full")
        return list(record_scans(store, scans))

    monkeypatch.setattr(Store, "record_scans", counting)
    extra = "scan:\n  jitter: 0s\n"
    async with running_daemon(tmp_path, hosts, extra=extra) as run:
        await run.advance(FIRST_SCAN_SPREAD_SECONDS)
        assert sum(groups) == len(hosts) and len(groups) < len(hosts) / 2, groups
        assert all(run.view(host).state.last_scan is not None for host in hosts)

        full_disk, groups[:] = True, []
        before = {host: run.view(host).state for host in hosts}
        await run.advance(HOUR)
        assert sum(groups) == len(hosts)
        assert all(run.view(host).state is before[host] for host in hosts), "published unsaved"
        assert run.daemon.snapshot.store.write_errors_total == len(hosts)

        full_disk = False
        await run.advance(HOUR)
    with Store.open(run.state_path) as store:
        rows = store.history(hosts[0], 0.0).scans
    assert len(rows) == 2  # the first round and the one after the disk had room again
