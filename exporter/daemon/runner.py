"""The daemon's life: start, schedule scans, fold results into state, reload, stop.

Theory of operation
-------------------
One event loop runs everything. `main_loop` starts the scans that are due (never more than
`scan.max_concurrent_hosts` at once) and sleeps until the next due time or until something
wakes it (a scan finished, a reload). A scan is the step the daemon was built with (see
`pipeline`: TCP scan and identification, all hosts drawing probes from one shared budget);
time is the `Clock` it was given, so tests run the daemon with a fake step on a fake clock.

A finished scan goes through the pure state machine, then into the store (grouped with the
scans that finished meanwhile into one transaction, in a worker thread: see `writer`), and
only then into the host's view that /metrics reads: a gauge never shows a change the store
could lose in a crash.

Every step costs O(log hosts) or less, whatever the size of the fleet: the due times sit in
a heap (`schedule.DueTimes`), a finished scan updates its own host's view in place, and the
immutable `Snapshot` readers see is assembled from the views only when read after a change.

If another process (the `baseline accept` command) wrote the host while it was scanned, the
store refuses the stale transition and the scan is folded again into the state the store now holds.

A reload re-reads the config file; a broken file leaves everything running as it was.
Hosts removed by a reload stop being scanned and exported; their history stays on disk.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import random
import threading
from dataclasses import replace
from pathlib import Path

import structlog

from exporter.config import Config, ConfigError, HostSpec, load_config
from exporter.daemon.clock import Clock, SystemClock
from exporter.daemon.pipeline import (
    BuildScan,
    ScanFn,
    build_scan_pipeline,
    close_scan_step,
    retire_scan_step,
)
from exporter.daemon.reporting import ScanReport, StoreHealth
from exporter.daemon.schedule import DueTimes, Planner
from exporter.daemon.snapshot import HostView, ReloadResult, ReloadStatus, Snapshot
from exporter.daemon.writer import ScanWriter
from exporter.model import HostScan
from exporter.state import HostState, Transition, ports_that_matter, reconfigure, step
from exporter.store import History, StaleStateError, Store, lost_store

log = structlog.get_logger("portscan_exporter")

# How often states written by other processes (`baseline accept`) are picked up.
POLL_STORE_SECONDS = 5.0
PRUNE_EVERY_SECONDS = 86400.0
# How often the same host's scan may be refused by the store for being stale in a row.
STALE_STATE_ATTEMPTS = 3
# A scan that recorded nothing is tried again after RETRY_SECONDS, doubling on each failure
# in a row up to RETRY_MAX_SECONDS (never sooner than the host's interval): a full disk or a
# locked database must not make the daemon spin.
RETRY_SECONDS = 10.0
RETRY_MAX_SECONDS = 600.0


class StoreLostError(OSError):
    """The store a daemon used before is gone: starting would silently relearn baselines."""


def _describe(exc: BaseException) -> str:
    """One line for an unexpected error: its type and the first line of its text."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        build_scan: BuildScan = build_scan_pipeline,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        relearn: bool = False,
    ) -> None:
        self._config = config
        self._specs = {spec.host: spec for spec in config.hosts}
        self._build_scan = build_scan
        # The operator's word that a lost store may start empty (--storage.relearn).
        self._relearn = relearn
        self._scan_fn: ScanFn | None = None  # built at start-up
        self._retiring: set[asyncio.Task[None]] = set()  # scan steps a reload replaced
        self._clock = clock or SystemClock()
        self._planner = Planner(config.scan, rng or random.Random())
        self._store: Store | None = None
        self._writer: ScanWriter | None = None
        self._states: dict[str, HostState] = {}
        self._schedule = DueTimes(config.scan.max_concurrent_hosts)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._filtered: dict[str, frozenset[int]] = {}
        self._failures: dict[str, int] = {}  # scans in a row that recorded nothing
        self._overdue_since: dict[str, float] = {}  # the due time the first of them had
        self._store_health = StoreHealth()
        self._report = ScanReport()
        self._wake = asyncio.Event()
        self._stopping = False
        now = self._clock.now()
        self._reload = ReloadStatus(successful=True, at=now, last_success_at=now)
        self._started_at = now
        self._ready = False
        # Each host's view, in config order, updated in place when that host changes: a
        # change costs O(1), not O(hosts). The immutable Snapshot readers get is built from
        # it when read and something changed since (`snapshot`): a busy fleet finishes
        # hundreds of scans between two scrapes.
        self._views: dict[str, HostView] = {}
        self._changed = True
        self._snapshot_lock = threading.Lock()  # readers call `snapshot` from threads too
        self._snapshot = self._build_snapshot()

    # -- Control (read by the HTTP surface) -------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        if self._changed:
            with self._snapshot_lock:
                if self._changed:
                    # Cleared first: a change made while building sets it again.
                    self._changed = False
                    self._snapshot = self._build_snapshot()
        return self._snapshot

    async def reload(self) -> ReloadResult:
        path = self._config.path
        now = self._clock.now()
        if not self._ready:
            return ReloadResult(successful=False, error="still starting: the state is loading")
        try:
            config = await asyncio.to_thread(load_config, path)
            scan_fn = await asyncio.to_thread(self._build_scan, config, self._scan_fn)
        except Exception as exc:  # whatever went wrong, the running config stays
            error = str(exc) if isinstance(exc, ConfigError | OSError) else _describe(exc)
            log.error("config reload failed, keeping the running config", error=error)
            self._reload = replace(self._reload, successful=False, at=now, error=error)
            self._publish()
            return ReloadResult(successful=False, error=error)
        await self._apply_config(config, scan_fn, now)
        self._reload = ReloadStatus(successful=True, at=now, last_success_at=now)
        log.info("config reloaded", file=str(path), hosts=len(config.hosts))
        self._publish()
        return ReloadResult(successful=True)

    async def accept(self, host: str, port: int | None) -> HostState:
        store = self._require_store()
        state = await asyncio.to_thread(store.accept, host, port, now=self._clock.now())
        if host in self._states:
            self._states[host] = state
            self._update_view(host)
        log.info("baseline accepted", host=host, port=port)
        return state

    async def history(self, host: str, since: float, until: float | None) -> History:
        store = self._require_store()
        return await asyncio.to_thread(store.history, host, since, until)

    # -- lifecycle ----------------------------------------------------------------------------

    async def startup(self) -> None:
        """Open the store, build the scan step and publish the stored state. The HTTP
        server already answers meanwhile (ready: 503); this can take a while with a large
        store or a large signature file."""
        config = self._config
        config.storage.path.parent.mkdir(parents=True, exist_ok=True)
        lost = await asyncio.to_thread(lost_store, config.storage.path)
        if lost is not None and not self._relearn:
            raise StoreLostError(lost)
        if lost is not None:
            log.warning("store lost, learning new baselines (--storage.relearn)", error=lost)
        # Exclusive: a second daemon on the same store is refused (StoreInUseError, an
        # OSError naming the holder); the CLI's history and accept open it beside us.
        self._store = await asyncio.to_thread(
            functools.partial(Store.open, config.storage.path, exclusive=True)
        )
        self._writer = ScanWriter(self._store)
        scan_fn = await asyncio.to_thread(self._build_scan, config, None)
        stored = await asyncio.to_thread(self._store.load_states)
        self._states = {}
        await self._apply_config(config, scan_fn, self._clock.now(), stored=stored)
        self._ready = True
        self._publish()
        # What start-up loaded (config, signatures, every host's state) lives as long as the
        # daemon: out of the collector's generations, so that full collections do not walk
        # a large fleet's objects again and again.
        gc.freeze()
        log.info(
            "started",
            hosts=len(config.hosts),
            store=str(config.storage.path),
            restored=sum(1 for spec in config.hosts if spec.host in stored),
        )

    async def main_loop(self) -> None:
        store = self._require_store()
        next_poll = next_prune = self._clock.now()
        while not self._stopping:
            now = self._clock.now()
            if now >= next_poll:
                await self._pick_up_external_writes(store)
                next_poll = now + POLL_STORE_SECONDS
            if now >= next_prune:
                await self._prune(store, now)
                next_prune = now + PRUNE_EVERY_SECONDS
            self._start_due_scans(now)
            wake_at = self._schedule.next_wake()
            idle_until = min(next_poll, next_prune, wake_at if wake_at is not None else next_poll)
            self._wake.clear()
            if not self._stopping:
                await self._clock.wait(self._wake, idle_until)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop scheduling, cancel scans in flight (they write nothing), close the store."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for retiring in list(self._retiring):
            retiring.cancel()
        await close_scan_step(self._scan_fn)
        if self._writer is not None:
            await self._writer.close()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None
        log.info("stopped", cancelled_scans=len(tasks))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    # -- scheduling -------------------------------------------------------------------------

    def _start_due_scans(self, now: float) -> None:
        for host in self._schedule.start_due(now):
            task = asyncio.create_task(self._scan(self._specs[host]), name=f"scan {host}")
            self._tasks[host] = task
            task.add_done_callback(functools.partial(self._scan_done, host))
            self._update_view(host)

    def _scan_done(self, host: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(host) is task:
            del self._tasks[host]
            self._schedule.finish(host)
            self._update_view(host)  # no longer scanning
        self._wake.set()

    # -- one scan ---------------------------------------------------------------------------

    async def _scan(self, spec: HostSpec) -> None:
        try:
            scan_fn = self._scan_fn
            if scan_fn is None:
                raise RuntimeError("no scan step: the daemon has not started")
            host_scan = await scan_fn(spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not stop the other hosts: log, retry later
            self._scan_failed(spec, exc, store=False)
            return
        try:
            transition = await self._record(spec, host_scan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # full disk, locked or vanished database, I/O error
            self._store_health = self._store_health.failed(exc)
            self._scan_failed(spec, exc, store=True)
            return
        self._store_health = self._store_health.succeeded(self._clock.now())
        self._failures.pop(spec.host, None)
        self._overdue_since.pop(spec.host, None)
        self._states[spec.host] = transition.new_state
        if host_scan.scan.ok:
            matter = set(ports_that_matter(transition.new_state))
            self._filtered[spec.host] = frozenset(matter.intersection(host_scan.scan.filtered))
        self._report.scan_finished(spec, host_scan, transition)
        # Counted from now, after identification too: a confirming scan must come
        # `confirm_after` after the first sighting was published, not after its TCP phase.
        self._schedule.set(
            spec.host,
            self._planner.next_due(
                spec, self._clock.now(), confirming=transition.needs_confirmation
            ),
        )
        self._update_view(spec.host)

    def _scan_failed(self, spec: HostSpec, error: Exception, *, store: bool) -> None:
        host = spec.host
        failures = self._failures[host] = self._failures.get(host, 0) + 1
        backoff = min(RETRY_SECONDS * 2 ** (failures - 1), RETRY_MAX_SECONDS)
        retry_in = max(backoff, min(spec.interval, RETRY_MAX_SECONDS))
        # Exported as the next scan stays the time the failed scan was due, so the scan
        # shows as overdue (PortscanScanStale) instead of always being just ahead.
        due = self._schedule.get(host)
        if due is not None:
            self._overdue_since.setdefault(host, due)
        self._schedule.set(host, self._clock.now() + retry_in)
        self._report.scan_failed(spec, error, retry_in=retry_in, store=store)
        self._update_view(host)

    async def _record(self, spec: HostSpec, host_scan: HostScan) -> Transition:
        """Step the state machine and write the result in one transaction. If another
        process wrote the host meanwhile, the store refuses the stale transition and the
        scan is folded into the state the store now holds."""
        store, writer = self._require_store(), self._require_writer()
        state = self._states.get(spec.host, HostState.initial(spec.host))
        scanned_ports = frozenset(spec.ports)
        for _ in range(STALE_STATE_ATTEMPTS):
            transition = step(
                state,
                host_scan,
                expected_open=spec.expected_open,
                scanned_ports=scanned_ports,
                confirmations=spec.confirmations,
            )
            try:
                await writer.record(host_scan, transition)
                return transition
            except StaleStateError:
                fresh = await asyncio.to_thread(store.load_state, spec.host)
                state = fresh or HostState.initial(spec.host)
        raise StaleStateError(f"host {spec.host}: the stored state keeps changing")

    # -- config -----------------------------------------------------------------------------

    async def _apply_config(
        self,
        config: Config,
        scan_fn: ScanFn,
        now: float,
        *,
        stored: dict[str, HostState] | None = None,
    ) -> None:
        store = self._require_store()
        if stored is None:
            stored = self._states
        if config.storage.path != self._config.storage.path:
            log.warning(
                "storage.path changes take effect at restart",
                running=str(self._config.storage.path),
                configured=str(config.storage.path),
            )
        wanted = {spec.host for spec in config.hosts}
        for host, task in list(self._tasks.items()):
            if host not in wanted:
                task.cancel()
        planner = Planner(config.scan, self._planner.rng)
        states: dict[str, HostState] = {}
        due: dict[str, float] = {}
        for spec in config.hosts:
            state = stored.get(spec.host) or HostState.initial(spec.host)
            transition = reconfigure(state, spec.expected_open, at=now)
            if transition.new_state != state:
                await asyncio.to_thread(store.record_transition, transition, now=now)
                state = transition.new_state
            states[spec.host] = state
            kept = self._schedule.get(spec.host)
            if kept is not None and spec.host in self._states:
                due[spec.host] = kept
            else:
                finished = state.last_scan.finished if state.last_scan else None
                due[spec.host] = planner.first_due(
                    spec, finished, now, confirming=bool(state.pending)
                )
        self._config = config
        self._specs = {spec.host: spec for spec in config.hosts}
        self._states = states
        self._schedule.replace_all(due)
        self._schedule.max_running = config.scan.max_concurrent_hosts
        if self._scan_fn is not None and self._scan_fn is not scan_fn:
            retiring = asyncio.create_task(retire_scan_step(self._scan_fn, scan_fn))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
        self._scan_fn = scan_fn
        self._planner = planner
        self._report.keep_only(wanted)
        self._filtered = {host: f for host, f in self._filtered.items() if host in wanted}
        self._failures = {host: n for host, n in self._failures.items() if host in wanted}
        self._overdue_since = {h: t for h, t in self._overdue_since.items() if h in wanted}
        # Built aside and swapped in whole: a scrape meanwhile must not see half the hosts.
        self._views = {spec.host: self._view_of(spec.host, self._views) for spec in config.hosts}
        self._changed = True
        self._wake.set()

    # -- store upkeep -----------------------------------------------------------------------

    async def _pick_up_external_writes(self, store: Store) -> None:
        # A store file deleted or replaced under us is noticed here, not only at the next
        # write (hours away): the write would go to the orphaned file.
        problem = await asyncio.to_thread(store.check_identity)
        if problem is not None:
            if self._store_health.last_error != problem:
                log.error("store file lost, writes are refused", error=problem)
            self._store_health = self._store_health.failed(RuntimeError(problem), count=False)
            self._publish()
            return
        changed = await asyncio.to_thread(store.poll_changes)
        updated = {host: state for host, state in changed.items() if host in self._states}
        for host, state in updated.items():
            self._states[host] = state
            self._update_view(host)

    async def _prune(self, store: Store, now: float) -> None:
        pruned = await asyncio.to_thread(store.prune, now - self._config.storage.retention)
        if pruned.scans or pruned.events or pruned.intervals:
            log.info(
                "history pruned",
                scans=pruned.scans,
                events=pruned.events,
                intervals=pruned.intervals,
            )

    def _require_store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the store is not open")
        return self._store

    def _require_writer(self) -> ScanWriter:
        if self._writer is None:
            raise RuntimeError("the store is not open")
        return self._writer

    # -- snapshot -----------------------------------------------------------------------------

    def _update_view(self, host: str) -> None:
        """Bring one host's view up to date: O(1) whatever the number of hosts."""
        if host in self._views:
            self._views[host] = self._view_of(host, self._views)
            self._changed = True

    def _view_of(self, host: str, views: dict[str, HostView]) -> HostView:
        spec = self._specs[host]
        state = self._states.get(host) or HostState.initial(host)
        due = self._overdue_since.get(host, self._schedule.get(host))
        scanning = host in self._schedule.running
        filtered = self._filtered.get(host)
        view = views.get(host)
        # An unchanged host keeps its view object: /metrics re-renders only new ones.
        if (
            view is None
            or view.spec is not spec
            or view.state is not state
            or view.next_scan != due
            or view.scanning != scanning
            or view.filtered != filtered
        ):
            view = HostView(
                spec=spec, state=state, next_scan=due, scanning=scanning, filtered=filtered
            )
        return view

    def _build_snapshot(self) -> Snapshot:
        # Before the stored state is loaded nothing is known of any host: export none rather
        # than hosts that look never scanned.
        views = self._views if self._ready else {}
        return Snapshot(
            hosts=tuple(views.values()),
            reload=self._reload,
            started_at=self._started_at,
            config_path=str(Path(self._config.path)),
            ready=self._ready,
            vantage=self._config.vantage,
            store=self._store_health,
            scans_total=dict(self._report.scans_total),
            probes_total=dict(self._report.probes_total),
        )

    def _publish(self) -> None:
        """Something daemon-wide changed (reload status, store health, readiness)."""
        self._changed = True
