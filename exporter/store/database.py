"""SQLite persistence: per-host state, scans, events and the port timeline.

Durability
----------
One finished scan is one transaction: the scans row, the host's new state, its events and its
timeline updates commit together or not at all, so a kill -9 at any moment loses at most the
scan in flight. The database runs in WAL mode with `synchronous=FULL`: a commit returns only
after the WAL is fsynced. NORMAL would survive kill -9 as well, but may lose the last commits
on power loss, and a lost commit is a confirmed change whose gauge Prometheus already scraped
and which would fire again after the restart. One fsync per finished scan costs nothing at
the rate scans finish.

Several processes
-----------------
The daemon keeps its connection open; the CLI (`history`, `baseline accept`) opens the same
file meanwhile. WAL lets readers run beside the writer; writers take the write lock up front
(`BEGIN IMMEDIATE`) and wait for each other up to `busy_timeout`. A writer that computed its
transition from a state someone else has since replaced gets `StaleStateError` instead of
overwriting it: every transition carries the state it started from, and it must still be the
one stored. `poll_changes` lets the daemon pick up states written by others.

Use one `Store` from one thread at a time (it locks, so several threads are merely serialised);
the daemon calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from exporter.model import UNKNOWN_SERVICE, HostScan
from exporter.state import (
    AcceptRefused,
    Event,
    EventKind,
    HostState,
    Severity,
    Transition,
    accept,
    is_identified,
    scan_outcome,
)

from .codec import decode_state, encode_state
from .schema import MIGRATIONS, Migration

DEFAULT_RETENTION_SECONDS = 400 * 86400.0
DEFAULT_BUSY_TIMEOUT_SECONDS = 10.0


class StoreError(Exception):
    """The store cannot do what was asked."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer version (more migrations than this one knows)."""


class StaleStateError(StoreError):
    """The transition started from a state that is no longer the stored one.

    Someone else (typically `baseline accept` from another process) wrote the host in between:
    reload it with `load_state`, step the scan again and record that.
    """


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    scan_id: int | None
    event: Event


@dataclass(frozen=True, slots=True)
class ScanRecord:
    id: int
    host: str
    started: float
    finished: float
    result: str
    address: str | None
    ports_scanned: int
    open_ports: int
    probes_sent: int
    error: str | None
    events: int


@dataclass(frozen=True, slots=True)
class Interval:
    """Port `port` answered with one service from `start` to `end` (None: still does)."""

    host: str
    port: int
    fingerprint: str
    service: str
    product: str
    version: str
    tls_sha256: str | None
    start: float
    last_seen: float
    end: float | None


@dataclass(frozen=True, slots=True)
class History:
    events: tuple[StoredEvent, ...]
    intervals: tuple[Interval, ...]
    scans: tuple[ScanRecord, ...]


@dataclass(frozen=True, slots=True)
class PruneResult:
    scans: int
    events: int
    intervals: int


class Store:
    """The on-disk state of the exporter. Create with `Store.open(path)`."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}  # host -> revision this instance last read or wrote
        self.path = path

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_SECONDS,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> Store:
        """Open (creating and migrating as needed) the database at `path`.

        `migrations` is the schema history to bring the file to; only tests pass another one.
        """
        conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path}: cannot use WAL journaling (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            _migrate(conn, path, migrations)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back already
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # One read transaction: every query inside sees the same snapshot.
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")

    # -- writing ---------------------------------------------------------------------------

    def record_scan(self, host_scan: HostScan, transition: Transition) -> bool:
        """Persist a finished scan and the transition `step` made of it, in one transaction.

        Returns False, writing nothing, when this scan (same host and start time) is already
        recorded. Raises StaleStateError when `transition.previous` is not the stored state.
        """
        result = host_scan.scan
        state = transition.new_state
        if (
            state.host != result.host
            or state.last_scan is None
            or state.last_scan.started != result.started
        ):
            raise ValueError(f"transition does not belong to the scan of {result.host}")
        finished = result.started + result.duration_seconds
        with self._write() as conn:
            seen = conn.execute(
                "SELECT 1 FROM scans WHERE host = ? AND started = ?", (result.host, result.started)
            ).fetchone()
            if seen is not None:
                return False
            self._check_previous(conn, transition.previous)
            scan_id = conn.execute(
                """INSERT INTO scans (host, started, finished, result, address, ports_scanned,
                                      open_ports, probes_sent, error, events)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id""",
                (
                    result.host,
                    result.started,
                    finished,
                    scan_outcome(result).value,
                    result.address,
                    result.ports_scanned,
                    len(result.open),
                    result.probes_sent,
                    result.error,
                    len(transition.events),
                ),
            ).fetchone()[0]
            self._put_state(conn, state, finished)
            _insert_events(conn, transition.events, scan_id)
            if result.ok:
                _update_timeline(conn, host_scan, transition, finished)
        return True

    def record_transition(self, transition: Transition, *, now: float) -> None:
        """Persist a transition that involved no scan (`reconfigure`, an `accept` made here)."""
        with self._write() as conn:
            self._check_previous(conn, transition.previous)
            self._put_state(conn, transition.new_state, now)
            _insert_events(conn, transition.events, None)

    def accept(self, host: str, port: int | None = None, *, now: float) -> HostState:
        """Move the learned baseline of `host` (or one port) to its confirmed state.

        Reads and writes in one transaction, so it is safe against a daemon writing the same
        host meanwhile (the daemon's next write gets StaleStateError and re-steps). Raises
        AcceptRefused with a message for the operator.
        """
        with self._write() as conn:
            row = conn.execute("SELECT state FROM hosts WHERE host = ?", (host,)).fetchone()
            if row is None:
                known = ", ".join(r[0] for r in conn.execute("SELECT host FROM hosts ORDER BY 1"))
                raise AcceptRefused(f"host {host}: unknown to the store (known: {known or 'none'})")
            transition = accept(decode_state(row[0]), port, at=now)
            self._put_state(conn, transition.new_state, now)
            _insert_events(conn, transition.events, None)
        return transition.new_state

    def prune(self, older_than: float) -> PruneResult:
        """Forget events, scans and closed intervals that ended before `older_than`."""
        with self._write() as conn:
            events = conn.execute("DELETE FROM events WHERE at < ?", (older_than,)).rowcount
            scans = conn.execute("DELETE FROM scans WHERE finished < ?", (older_than,)).rowcount
            intervals = conn.execute(
                "DELETE FROM intervals WHERE end_at IS NOT NULL AND end_at < ?", (older_than,)
            ).rowcount
        return PruneResult(scans=scans, events=events, intervals=intervals)

    def _check_previous(self, conn: sqlite3.Connection, previous: HostState) -> None:
        row = conn.execute("SELECT state FROM hosts WHERE host = ?", (previous.host,)).fetchone()
        stored = encode_state(HostState.initial(previous.host)) if row is None else row[0]
        if stored != encode_state(previous):
            raise StaleStateError(
                f"host {previous.host}: the stored state changed since this transition began"
            )

    def _put_state(self, conn: sqlite3.Connection, state: HostState, now: float) -> None:
        revision = conn.execute(
            """INSERT INTO hosts (host, state, revision, updated) VALUES (?, ?, 1, ?)
               ON CONFLICT (host) DO UPDATE
               SET state = excluded.state, revision = revision + 1, updated = excluded.updated
               RETURNING revision""",
            (state.host, encode_state(state), now),
        ).fetchone()[0]
        self._seen[state.host] = revision

    # -- reading ---------------------------------------------------------------------------

    def hosts(self) -> list[str]:
        with self._read() as conn:
            return [r[0] for r in conn.execute("SELECT host FROM hosts ORDER BY host")]

    def load_states(self) -> dict[str, HostState]:
        """Every host's state, to rebuild the in-memory snapshot at start."""
        with self._read() as conn:
            rows = conn.execute("SELECT host, state, revision FROM hosts ORDER BY host").fetchall()
        self._seen.update((host, revision) for host, _, revision in rows)
        return {host: decode_state(text) for host, text, _ in rows}

    def load_state(self, host: str) -> HostState | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT state, revision FROM hosts WHERE host = ?", (host,)
            ).fetchone()
        if row is None:
            return None
        self._seen[host] = row[1]
        return decode_state(row[0])

    def poll_changes(self) -> dict[str, HostState]:
        """States written by someone else since this Store last read or wrote them."""
        with self._read() as conn:
            revisions = conn.execute("SELECT host, revision FROM hosts").fetchall()
            changed = [host for host, rev in revisions if self._seen.get(host) != rev]
            rows = [
                conn.execute(
                    "SELECT host, state, revision FROM hosts WHERE host = ?", (host,)
                ).fetchone()
                for host in changed
            ]
        self._seen.update((host, revision) for host, _, revision in rows)
        return {host: decode_state(text) for host, text, _ in rows}

    def history(self, host: str, since: float, until: float | None = None) -> History:
        """Events, timeline intervals and scans of `host` that overlap [since, until]."""
        end = math.inf if until is None else until
        with self._read() as conn:
            events = conn.execute(
                """SELECT id, scan_id, at, host, port, kind, severity, old_service, new_service,
                          resolved
                   FROM events WHERE host = ? AND at >= ? AND at <= ? ORDER BY id""",
                (host, since, end),
            ).fetchall()
            intervals = conn.execute(
                """SELECT host, port, fingerprint, service, product, version, tls_sha256,
                          start_at, last_seen, end_at
                   FROM intervals
                   WHERE host = ? AND start_at <= ? AND (end_at IS NULL OR end_at >= ?)
                   ORDER BY port, start_at""",
                (host, end, since),
            ).fetchall()
            scans = conn.execute(
                """SELECT id, host, started, finished, result, address, ports_scanned,
                          open_ports, probes_sent, error, events
                   FROM scans WHERE host = ? AND finished >= ? AND started <= ?
                   ORDER BY started""",
                (host, since, end),
            ).fetchall()
        return History(
            events=tuple(
                StoredEvent(
                    id=r[0],
                    scan_id=r[1],
                    event=Event(
                        at=r[2],
                        host=r[3],
                        port=r[4],
                        kind=EventKind(r[5]),
                        severity=Severity(r[6]),
                        old_service=r[7],
                        new_service=r[8],
                        resolved=bool(r[9]),
                    ),
                )
                for r in events
            ),
            intervals=tuple(Interval(*r) for r in intervals),
            scans=tuple(ScanRecord(*r) for r in scans),
        )


def _check_version(path: Path, version: int, migrations: Sequence[Migration]) -> None:
    if version > len(migrations):
        raise SchemaTooNewError(
            f"{path}: schema version {version} is newer than this program's"
            f" ({len(migrations)}); use a newer portscan-exporter"
        )


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    _check_version(path, version, migrations)
    if version == len(migrations):
        return  # up to date: no write lock, so `history` opens even while the daemon writes
    conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file: one migrates
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        _check_version(path, version, migrations)
        for number, migration in enumerate(migrations[version:], start=version + 1):
            for step in migration:
                if isinstance(step, str):
                    conn.execute(step)
                else:
                    step(conn)
            conn.execute(f"PRAGMA user_version = {number}")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _insert_events(conn: sqlite3.Connection, events: Iterable[Event], scan_id: int | None) -> None:
    conn.executemany(
        """INSERT INTO events (scan_id, at, host, port, kind, severity, old_service,
                               new_service, resolved)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        [
            (
                scan_id,
                e.at,
                e.host,
                e.port,
                e.kind.value,
                e.severity.value,
                e.old_service,
                e.new_service,
                int(e.resolved),
            )
            for e in events
        ],
    )


def _update_timeline(
    conn: sqlite3.Connection, host_scan: HostScan, transition: Transition, at: float
) -> None:
    """Extend, close and open intervals from what a successful scan observed.

    An unidentified sighting extends the interval of whatever was identified before it (the
    same rule the state machine uses); a port that the scan did not probe keeps its interval.
    """
    result = host_scan.scan
    current = {
        port: (interval_id, fingerprint)
        for interval_id, port, fingerprint in conn.execute(
            "SELECT id, port, fingerprint FROM intervals WHERE host = ? AND end_at IS NULL",
            (result.host,),
        )
    }
    extend: list[tuple[float, int]] = []
    close: list[tuple[float, int]] = []
    start: list[tuple[object, ...]] = []
    for port in sorted(result.open):
        identity = host_scan.services.get(port, UNKNOWN_SERVICE)
        if port in current:
            interval_id, fingerprint = current.pop(port)
            if fingerprint == identity.fingerprint or not is_identified(identity):
                extend.append((at, interval_id))
                continue
            close.append((at, interval_id))
        start.append(
            (
                result.host,
                port,
                identity.fingerprint,
                identity.service,
                identity.product,
                identity.version,
                None if identity.tls is None else identity.tls.sha256,
                at,
                at,
            )
        )
    for port, (interval_id, _) in current.items():
        if port in transition.scanned or result.state_of(port) is not None:
            close.append((at, interval_id))
    conn.executemany("UPDATE intervals SET last_seen = ? WHERE id = ?", extend)
    # Closing before opening: the partial unique index allows one open interval per port.
    conn.executemany("UPDATE intervals SET end_at = ? WHERE id = ?", close)
    conn.executemany(
        """INSERT INTO intervals (host, port, fingerprint, service, product, version,
                                  tls_sha256, start_at, last_seen)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        start,
    )
