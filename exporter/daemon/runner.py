"""The daemon's life: start, schedule scans, fold results into state, reload, stop.

Theory of operation
-------------------
One event loop runs everything. `main_loop` starts the scans that are due (never more than
`scan.max_concurrent_hosts` at once, all drawing probes from one shared ProbeBudget) and
sleeps until the next due time or until something wakes it (a scan finished, a reload).

A finished scan goes through the pure state machine, then into the store (one transaction,
in a worker thread), and only then into the in-memory snapshot that /metrics reads: a gauge
never shows a change the store could lose in a crash. If another process (the `baseline
accept` command) wrote the host in between, the store refuses the stale transition and the
scan is folded again into the state the store now holds.

A reload re-reads the config file; a broken file leaves everything running as it was.
Hosts removed by a reload stop being scanned and exported; their history stays on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from exporter.config import Config, ConfigError, HostSpec, load_config
from exporter.daemon.schedule import Planner
from exporter.daemon.snapshot import HostView, ReloadResult, ReloadStatus, Snapshot
from exporter.fingerprint import FingerprintOptions, SignatureDB, identify_scanned, load_signatures
from exporter.model import HostScan, ServiceIdentity
from exporter.scanner import ProbeBudget, ScanOptions, raise_fd_limit, scan_host
from exporter.state import HostState, Transition, reconfigure, scan_outcome, step
from exporter.store import History, StaleStateError, Store

log = structlog.get_logger("portscan_exporter")

# How often states written by other processes (`baseline accept`) are picked up.
POLL_STORE_SECONDS = 5.0
PRUNE_EVERY_SECONDS = 86400.0


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._specs = {spec.host: spec for spec in config.hosts}
        self._clock = clock
        self._planner = Planner(config.scan, rng or random.Random())
        self._store: Store | None = None
        self._states: dict[str, HostState] = {}
        self._due: dict[str, float] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._scans_total: dict[tuple[str, str], int] = {}
        self._probes_total: dict[str, int] = {}
        self._budget = ProbeBudget(self._probe_limit(config))
        self._signatures: SignatureDB | None = None  # None: identification is off
        self._fingerprint_options = self._fp_options_of(config)
        # One limit on ports being identified, across all hosts scanned at once.
        self._identify_limit = asyncio.Semaphore(config.fingerprint.concurrency)
        now = clock()
        self._reload = ReloadStatus(successful=True, at=now, last_success_at=now)
        self._started_at = now
        self._ready = False
        self._snapshot = self._build_snapshot()

    # -- Control (read by the HTTP surface) -------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def reload(self) -> ReloadResult:
        path = self._config.path
        now = self._clock()
        try:
            config = await asyncio.to_thread(load_config, path)
            signatures = await asyncio.to_thread(self._load_signatures, config)
        except (ConfigError, OSError, ValueError) as exc:
            error = str(exc)
            log.error("config reload failed, keeping the running config", error=error)
            self._reload = replace(self._reload, successful=False, at=now, error=error)
            self._publish()
            return ReloadResult(successful=False, error=error)
        await self._apply_config(config, signatures, now)
        self._reload = ReloadStatus(successful=True, at=now, last_success_at=now)
        log.info("config reloaded", file=str(path), hosts=len(config.hosts))
        self._publish()
        return ReloadResult(successful=True)

    async def accept(self, host: str, port: int | None) -> HostState:
        store = self._require_store()
        state = await asyncio.to_thread(store.accept, host, port, now=self._clock())
        if host in self._states:
            self._states[host] = state
            self._publish()
        log.info("baseline accepted", host=host, port=port)
        return state

    async def history(self, host: str, since: float, until: float | None) -> History:
        store = self._require_store()
        return await asyncio.to_thread(store.history, host, since, until)

    # -- lifecycle ----------------------------------------------------------------------------

    async def startup(self) -> None:
        config = self._config
        config.storage.path.parent.mkdir(parents=True, exist_ok=True)
        self._store = await asyncio.to_thread(Store.open, config.storage.path)
        self._signatures = await asyncio.to_thread(self._load_signatures, config)
        stored = await asyncio.to_thread(self._store.load_states)
        self._states = {}
        await self._apply_config(config, self._signatures, self._clock(), stored=stored)
        self._ready = True
        self._publish()
        log.info(
            "started",
            hosts=len(config.hosts),
            store=str(config.storage.path),
            restored=sum(1 for spec in config.hosts if spec.host in stored),
        )

    async def main_loop(self) -> None:
        store = self._require_store()
        next_poll = next_prune = self._clock()
        while not self._stopping:
            now = self._clock()
            if now >= next_poll:
                await self._pick_up_external_writes(store)
                next_poll = now + POLL_STORE_SECONDS
            if now >= next_prune:
                await self._prune(store, now)
                next_prune = now + PRUNE_EVERY_SECONDS
            self._start_due_scans(now)
            idle_until = min([next_poll, next_prune, *self._next_startable()])
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, idle_until - now))

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop scheduling, cancel scans in flight (they write nothing), close the store."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None
        log.info("stopped", cancelled_scans=len(tasks))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    # -- scheduling -------------------------------------------------------------------------

    def _next_startable(self) -> list[float]:
        """Due times worth waking for: none while every scan slot is taken (a finishing
        scan wakes the loop), else those of the hosts not being scanned."""
        if len(self._running) >= self._config.scan.max_concurrent_hosts:
            return []
        return [due for host, due in self._due.items() if host not in self._running]

    def _start_due_scans(self, now: float) -> None:
        limit = self._config.scan.max_concurrent_hosts
        waiting = sorted(
            (due, host)
            for host, due in self._due.items()
            if due <= now and host not in self._running
        )
        for _, host in waiting[: max(0, limit - len(self._running))]:
            spec = self._spec(host)
            if spec is None:
                continue
            task = asyncio.create_task(self._scan(spec), name=f"scan {host}")
            self._running[host] = task
            task.add_done_callback(functools.partial(self._scan_done, host))
        if waiting:
            self._publish()

    def _scan_done(self, host: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(host, None)
        self._publish()  # scan_in_progress back to 0
        self._wake.set()

    def _spec(self, host: str) -> HostSpec | None:
        return self._specs.get(host)

    # -- one scan ---------------------------------------------------------------------------

    async def _scan(self, spec: HostSpec) -> None:
        try:
            await self._scan_and_record(spec)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug or a storage failure must not stop the other hosts: log, retry later.
            log.exception("scan failed", host=spec.host)
            self._due[spec.host] = self._planner.next_due(spec, self._clock(), confirming=False)

    async def _scan_and_record(self, spec: HostSpec) -> None:
        options = ScanOptions(
            timeout=spec.timeout,
            retries=spec.retries,
            concurrency=spec.concurrency,
            rate=spec.rate,
        )
        result = await scan_host(spec.host, spec.ports, options, budget=self._budget)
        services: dict[int, ServiceIdentity] = {}
        if self._signatures is not None:
            services = await identify_scanned(
                result,
                db=self._signatures,
                options=self._fingerprint_options,
                limiter=self._identify_limit,
            )
        host_scan = HostScan(scan=result, services=services)
        transition = await self._record(spec, host_scan)
        state = transition.new_state
        self._states[spec.host] = state
        outcome = scan_outcome(result).value
        key = (spec.host, outcome)
        self._scans_total[key] = self._scans_total.get(key, 0) + 1
        self._probes_total[spec.host] = self._probes_total.get(spec.host, 0) + result.probes_sent
        # Counted from now, after identification too: a confirming scan must come
        # `confirm_after` after the first sighting was published, not after its TCP phase.
        self._due[spec.host] = self._planner.next_due(
            spec, self._clock(), confirming=transition.needs_confirmation
        )
        for event in transition.events:
            if event.port is None:  # host-wide bookkeeping: baseline learned or accepted
                log.info(event.kind.value.lower().replace("_", " "), host=event.host)
                continue
            log.warning(
                "change resolved" if event.resolved else "change confirmed",
                host=event.host,
                port=event.port,
                change=event.kind.value,
                severity=event.severity.value,
                old_service=event.old_service,
                new_service=event.new_service,
            )
        log.info(
            "scan finished",
            host=spec.host,
            address=result.address,
            result=outcome,
            error=result.error,
            duration_seconds=round(result.duration_seconds, 3),
            ports_scanned=result.ports_scanned,
            open=len(result.open),
            pending=len(state.pending),
            confirming=transition.needs_confirmation,
        )
        self._publish()

    async def _record(self, spec: HostSpec, host_scan: HostScan) -> Transition:
        store = self._require_store()
        state = self._states.get(spec.host, HostState.initial(spec.host))
        for _ in range(3):
            transition = step(
                state,
                host_scan,
                expected_open=spec.expected_open,
                scanned_ports=frozenset(spec.ports),
                confirmations=spec.confirmations,
            )
            try:
                await asyncio.to_thread(store.record_scan, host_scan, transition)
                return transition
            except StaleStateError:
                # Someone else (baseline accept) wrote this host: fold the scan into theirs.
                fresh = await asyncio.to_thread(store.load_state, spec.host)
                state = fresh or HostState.initial(spec.host)
        raise StaleStateError(f"host {spec.host}: the stored state keeps changing")

    # -- config -----------------------------------------------------------------------------

    async def _apply_config(
        self,
        config: Config,
        signatures: SignatureDB | None,
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
        for host, task in list(self._running.items()):
            if host not in wanted:
                task.cancel()
        states: dict[str, HostState] = {}
        due: dict[str, float] = {}
        for spec in config.hosts:
            state = stored.get(spec.host) or HostState.initial(spec.host)
            transition = reconfigure(state, spec.expected_open, at=now)
            if transition.new_state != state:
                await asyncio.to_thread(store.record_transition, transition, now=now)
                state = transition.new_state
            states[spec.host] = state
            if spec.host in self._due and spec.host in self._states:
                due[spec.host] = self._due[spec.host]
            else:
                finished = state.last_scan.finished if state.last_scan else None
                due[spec.host] = self._planner.first_due(spec, finished, now)
        if config.fingerprint.concurrency != self._config.fingerprint.concurrency:
            self._identify_limit = asyncio.Semaphore(config.fingerprint.concurrency)
        self._config = config
        self._specs = {spec.host: spec for spec in config.hosts}
        self._states = states
        self._due = due
        self._signatures = signatures
        self._fingerprint_options = self._fp_options_of(config)
        self._planner = Planner(config.scan, self._planner.rng)
        limit = self._probe_limit(config)
        if limit != self._budget.limit:
            self._budget = ProbeBudget(limit)
        self._wake.set()

    @staticmethod
    def _probe_limit(config: Config) -> int:
        allowed = raise_fd_limit(config.scan.max_probes)
        if allowed < config.scan.max_probes:
            log.warning(
                "open-file limit too low for scan.max_probes, lowering it",
                max_probes=config.scan.max_probes,
                allowed=allowed,
            )
        return allowed

    @classmethod
    def _load_signatures(cls, config: Config) -> SignatureDB | None:
        if not config.fingerprint.enabled:
            return None
        return load_signatures(cls._fp_options_of(config))

    @staticmethod
    def _fp_options_of(config: Config) -> FingerprintOptions:
        fp = config.fingerprint
        return FingerprintOptions(
            timeout=fp.timeout,
            max_bytes=fp.max_bytes,
            concurrency=fp.concurrency,
            nmap_service_probes=fp.nmap_service_probes,
        )

    # -- store upkeep -----------------------------------------------------------------------

    async def _pick_up_external_writes(self, store: Store) -> None:
        changed = await asyncio.to_thread(store.poll_changes)
        updated = {host: state for host, state in changed.items() if host in self._states}
        if updated:
            self._states.update(updated)
            self._publish()

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

    # -- snapshot -----------------------------------------------------------------------------

    def _build_snapshot(self, previous: Snapshot | None = None) -> Snapshot:
        hosts = []
        for spec in self._config.hosts:
            host = spec.host
            state = self._states.get(host) or HostState.initial(host)
            # While a scan runs this stays the time it was due: a scan that hangs shows as
            # overdue (PortscanScanStale) instead of dropping the series.
            due, scanning = self._due.get(host), host in self._running
            view = previous.host(host) if previous is not None else None
            # An unchanged host keeps its view object: /metrics re-renders only new ones.
            if (
                view is None
                or view.spec is not spec
                or view.state is not state
                or view.next_scan != due
                or view.scanning != scanning
            ):
                view = HostView(spec=spec, state=state, next_scan=due, scanning=scanning)
            hosts.append(view)
        return Snapshot(
            hosts=tuple(hosts),
            reload=self._reload,
            started_at=self._started_at,
            config_path=str(Path(self._config.path)),
            ready=self._ready,
            scans_total=dict(self._scans_total),
            probes_total=dict(self._probes_total),
        )

    def _publish(self) -> None:
        self._snapshot = self._build_snapshot(self._snapshot)
