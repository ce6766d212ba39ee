"""SQLite persistence: per-host state, scans, events and the port timeline.

Durability
----------
One finished scan is written atomically: the scans row, the host's new state, its events and
its timeline updates commit together or not at all, so a kill -9 at any moment loses at most
the scans in flight. The daemon groups the scans that finish while a write is under way into
one transaction (`record_scans`, a savepoint per scan): a fleet finishes hundreds of scans a
second, and one fsync per scan would bound the scan rate. The database runs in WAL mode with
`synchronous=FULL`: a commit returns only after the WAL is fsynced. NORMAL would survive
kill -9 as well, but may lose the last commits on power loss, and a lost commit is a
confirmed change whose gauge Prometheus already scraped and which would fire again after
the restart.

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

One daemon per store
--------------------
Two daemons on one file would both scan every host and both write it. The daemon opens the
store with `exclusive=True`, which takes `flock(LOCK_EX | LOCK_NB)` on a sidecar file
(`state.sqlite.lock`) before touching the database and holds it for the Store's life; a second
daemon gets `StoreInUseError` naming the file and the holder's pid, which the holder writes
into the lock file. The kernel drops the lock when the holder's descriptor closes, kill -9
included, so a crash never leaves a stale lock to clean up. SQLite's own locks cannot do this:
they last one transaction, and a daemon holds none between scans. The CLI opens without the
lock and works beside the daemon, as described above. The lock file is never deleted: removing
it while a third process is opening it would let two holders lock two different files.
The descriptor is close-on-exec, but a process forked without exec would share the lock.

The file under a running daemon
-------------------------------
An open SQLite connection keeps the inode it opened: if the file is deleted, or replaced by a
rename (a restored backup, a careless `mv`), every later write "succeeds" into a file nobody
will ever read, and the next start finds a different store. `open` records the file's
(st_dev, st_ino); `check_identity` compares it with what the path names now, one stat(2),
and every write transaction checks it at BEGIN and again before COMMIT, raising
`StoreReplacedError` and rolling back, so nothing more goes to the orphaned file. The orphan's
write-ahead log is a hazard of its own: it keeps its name (`state.sqlite-wal`), and SQLite
replays a log onto whatever database it finds beside it, so whoever opens a replacement at the
path reads the orphan's pages. On noticing, the Store checkpoints the orphan and truncates
that log to nothing (`_empty_orphan_log`); until someone notices, the hazard stands, which is
why the daemon should call `check_identity` on a schedule and not only when it writes.
`created` tells whether `open` found no schema (a missing or empty file), so the daemon can
tell a store it starts afresh from one it resumes. A file overwritten in place (same inode,
e.g. `cp backup state.sqlite`) is not detected this way; that corrupts any SQLite database.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
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
LOCK_SUFFIX = ".lock"


class StoreError(Exception):
    """The store cannot do what was asked."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer version (more migrations than this one knows)."""


class StoreInUseError(StoreError, OSError):
    """Another process holds the exclusive lock: another daemon runs on this store.

    An OSError too, so that code handling "cannot open the store" catches it. `pid` is the
    holder's process id when its lock file says so, else None.
    """

    def __init__(self, message: str, *, path: Path, lock_path: Path, pid: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.lock_path = lock_path
        self.pid = pid


class StoreReplacedError(StoreError):
    """The file at the store's path is no longer the file this Store opened.

    It was deleted, renamed away or replaced while open; the write was refused and rolled back
    so that nothing goes to the orphaned file. The message is for the operator.
    """


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
    """The on-disk state of the exporter. Create with `Store.open(path)`.

    `created` is True when `open` found no schema and created it (a new store), `exclusive`
    whether this Store holds the one-daemon lock.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        identity: tuple[int, int],
        created: bool = False,
        lock_fd: int | None = None,
    ) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}  # host -> revision this instance last read or wrote
        self._data_version: int | None = None  # PRAGMA data_version at the last poll_changes
        self._identity = identity  # (st_dev, st_ino) of the file the connection opened
        self._orphan_log_emptied = False
        self._lock_fd = lock_fd
        self.path = path
        self.created = created

    @property
    def exclusive(self) -> bool:
        return self._lock_fd is not None

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        exclusive: bool = False,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_SECONDS,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> Store:
        """Open (creating and migrating as needed) the database at `path`.

        `exclusive=True` is for the daemon: it first locks `lock_path(path)` for the life of
        the Store and raises StoreInUseError when another process holds it. The CLI opens
        without it, beside a running daemon.
        `migrations` is the schema history to bring the file to; only tests pass another one.
        """
        lock_fd = _lock_exclusively(path) if exclusive else None
        try:
            conn = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        try:
            # The connection has opened (or created) the file: this is the inode it writes.
            info = os.stat(path)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path}: cannot use WAL journaling (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            found = _migrate(conn, path, migrations)
        except BaseException:
            conn.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(
            conn,
            path,
            identity=(info.st_dev, info.st_ino),
            created=found == 0,
            lock_fd=lock_fd,
        )

    def close(self) -> None:
        with self._lock:
            if self._identity_problem() is not None:
                self._empty_orphan_log()
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            self._conn.close()
            # Released only after the connection closed, so that the next daemon finds the
            # file checkpointed and no longer written.
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def check_identity(self) -> str | None:
        """None while the path still names the file this Store opened, else why not.

        One stat(2) while all is well; the daemon can call it on its own schedule to notice a
        deleted or replaced store between writes, which check it anyway. The first time it
        finds the file gone, it also empties this Store's write-ahead log (`_empty_orphan_log`).
        """
        problem = self._identity_problem()
        if problem is not None and not self._orphan_log_emptied:
            with self._lock:
                self._empty_orphan_log()
        return problem

    def _empty_orphan_log(self) -> None:
        """Checkpoint the orphaned file and truncate its write-ahead log to nothing.

        The log keeps its name, `<path>-wal`, after the database file is deleted or renamed,
        and SQLite replays a log onto whatever database it finds beside it: anyone opening a
        replacement at the path would read the orphan's pages instead (and SQLite itself skips
        the checkpoint on close once it sees the file moved, leaving the log behind). The
        checkpoint writes only what was already committed, into the orphaned file.
        """
        if self._orphan_log_emptied:
            return
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._orphan_log_emptied = True

    def _identity_problem(self) -> str | None:
        dev, ino = self._identity
        try:
            info = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return (
                f"{self.path}: the store file was deleted or moved away while in use"
                f" (it was inode {ino} on device {dev}); refusing to write to the orphaned file"
            )
        except OSError as exc:
            return f"{self.path}: cannot check the store file: {exc.strerror or exc}"
        if (info.st_dev, info.st_ino) != (dev, ino):
            return (
                f"{self.path}: the store file was replaced while in use (it was inode {ino}"
                f" on device {dev}, the path now names inode {info.st_ino} on device"
                f" {info.st_dev}); refusing to write to the orphaned file"
            )
        return None

    def _check_identity_or_raise(self) -> None:
        problem = self._identity_problem()
        if problem is not None:
            raise StoreReplacedError(problem)

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
                # Checked at BEGIN, so that the caller learns before doing the work, and before
                # COMMIT, so that a file replaced meanwhile gets nothing either.
                self._check_identity_or_raise()
                yield self._conn
                self._check_identity_or_raise()
            except BaseException as exc:
                if self._conn.in_transaction:  # SQLite may have rolled back already
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, StoreReplacedError):
                    self._empty_orphan_log()
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
        outcome = self.record_scans([(host_scan, transition)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def record_scans(
        self, scans: Sequence[tuple[HostScan, Transition]]
    ) -> list[bool | StaleStateError]:
        """Persist several hosts' finished scans in one transaction (one fsync).

        Each scan is written under its own savepoint, so the outcome is per scan, as
        `record_scan` would give it: True, False (already recorded), or a StaleStateError
        (returned, not raised) for a scan whose host someone else wrote meanwhile; that scan
        writes nothing and the others are kept. Any other error (full disk, I/O error, the
        file replaced) is raised and writes nothing at all: each scan's state, events and
        timeline still commit together or not, whatever is batched with them.
        """
        for host_scan, transition in scans:
            _check_belongs(host_scan, transition)
        outcomes: list[bool | StaleStateError] = []
        with self._write() as conn:
            for host_scan, transition in scans:
                conn.execute("SAVEPOINT scan")
                try:
                    outcomes.append(self._record_one(conn, host_scan, transition))
                except StaleStateError as exc:
                    conn.execute("ROLLBACK TO scan")
                    outcomes.append(exc)
                conn.execute("RELEASE scan")
        return outcomes

    def _record_one(
        self, conn: sqlite3.Connection, host_scan: HostScan, transition: Transition
    ) -> bool:
        result = host_scan.scan
        finished = result.started + result.duration_seconds
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
        self._put_state(conn, transition.new_state, finished)
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
        """States written by someone else since this Store last read or wrote them.

        Cheap while nobody else writes (the daemon calls it every few seconds, whatever the
        number of hosts): SQLite's data_version changes only when another connection commits.
        """
        with self._read() as conn:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return {}
            self._data_version = version
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


def _check_belongs(host_scan: HostScan, transition: Transition) -> None:
    result, state = host_scan.scan, transition.new_state
    if (
        state.host != result.host
        or state.last_scan is None
        or state.last_scan.started != result.started
    ):
        raise ValueError(f"transition does not belong to the scan of {result.host}")


def lock_path(path: Path) -> Path:
    """The sidecar file a daemon locks to own the store at `path`."""
    return path.with_name(path.name + LOCK_SUFFIX)


def lost_store(path: Path) -> str | None:
    """Why the store at `path` looks lost, or None: a daemon ran on it (its lock file, which
    is never deleted, names a process) but the database is gone or empty. Starting on it
    would silently learn fresh baselines, and with them whatever opened meanwhile."""
    sidecar = lock_path(path)
    try:
        locked_before = sidecar.stat().st_size > 0
    except OSError:
        return None
    try:
        empty = path.stat().st_size == 0
    except FileNotFoundError:
        empty = True
    except OSError:
        return None
    if not (locked_before and empty):
        return None
    return (
        f"{path}: the store is gone or empty, but a daemon ran on it before ({sidecar} exists):"
        " its baselines, pending confirmations and history are lost. Restore it from a backup,"
        " or start with --storage.relearn to learn new baselines from the next scans (a port"
        " opened meanwhile would then be learned as expected)"
    )


def _lock_exclusively(path: Path) -> int:
    """Lock `lock_path(path)` and write our pid in it; the descriptor holds the lock."""
    sidecar = lock_path(path)
    fd = os.open(sidecar, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            holder = "another process" if pid is None else f"process {pid}"
            raise StoreInUseError(
                f"{path}: the store is in use by another portscan-exporter daemon ({holder}"
                f" holds {sidecar}); stop that daemon first, or give this one another"
                " storage.path",
                path=path,
                lock_path=sidecar,
                pid=pid,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_pid(fd: int) -> int | None:
    # The holder may not have written it yet (it writes right after locking): None then.
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _check_version(path: Path, version: int, migrations: Sequence[Migration]) -> None:
    if version > len(migrations):
        raise SchemaTooNewError(
            f"{path}: schema version {version} is newer than this program's"
            f" ({len(migrations)}); use a newer portscan-exporter"
        )


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> int:
    """Bring the file to the newest version; returns the version it was found at."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    _check_version(path, version, migrations)
    if version == len(migrations):
        return version  # up to date: no write lock, so `history` opens while the daemon writes
    conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file: one migrates
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        _check_version(path, version, migrations)
        found = version
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
    return found


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
