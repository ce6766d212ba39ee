"""Tests of the SQLite store: schema, transactions, timeline, restarts and kill -9.

The crash tests run this file as a writer process (`python tests/test_store.py writer ...`)
that records a deterministic sequence of scans and is killed with SIGKILL at random moments;
the lock tests run it as a daemon holding the store (`... hold-exclusive PATH`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from exporter.commands.history import history_table
from exporter.model import (
    UNKNOWN_SERVICE,
    HostScan,
    ScanResult,
    ServiceIdentity,
    TLSInfo,
    decode_fingerprint,
    encode_fingerprint,
)
from exporter.state import (
    AcceptRefused,
    BaselineSource,
    EventKind,
    HostState,
    Transition,
    accept,
    port_status,
    reconfigure,
    step,
)
from exporter.store import (
    MIGRATIONS,
    CodecError,
    SchemaTooNewError,
    StaleStateError,
    Store,
    StoreInUseError,
    StoreReplacedError,
    decode_state,
    encode_state,
    lock_path,
)

T0 = 1_700_000_000.0
PERIOD = 600.0
SCANNED = range(1, 10001)
HOSTS = ("alpha", "beta", "gamma")
EXPECTED: dict[str, tuple[int, ...] | None] = {"alpha": None, "beta": None, "gamma": (22, 80)}
SSH = ServiceIdentity("ssh", "OpenSSH", "9.2p1", banner="SSH-2.0-OpenSSH_9.2p1")
SSH_NEW = ServiceIdentity("ssh", "OpenSSH", "9.6p1", banner="SSH-2.0-OpenSSH_9.6p1")
HTTP = ServiceIdentity("http", "nginx", "1.22.1")
TLS = TLSInfo("TLSv1.3", "CN=web", "CN=ca", ("web",), T0 + 1e7, "ab" * 32)
HTTPS = ServiceIdentity("https", "nginx", "1.22.1", tls=TLS)
WRITER_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def make_scan(host: str, i: int, services: dict[int, ServiceIdentity] | None) -> HostScan:
    """Scan number `i` of `host`; services None: the host did not answer."""
    started = T0 + PERIOD * i
    if services is None:
        return HostScan(ScanResult(host, "192.0.2.7", started, 3.0, len(SCANNED), False))
    result = ScanResult(
        host, "192.0.2.7", started, 2.5, len(SCANNED), True, open=tuple(sorted(services))
    )
    return HostScan(result, dict(services))


def random_scan(host: str, i: int) -> HostScan:
    """A deterministic, eventful history: sustained phases of change plus one-scan flaps."""
    rng = random.Random(f"{host}:{i}")
    if rng.random() < 0.08:
        return make_scan(host, i, None)
    services = {22: SSH, 80: HTTP}
    phase = (i // 5 + HOSTS.index(host)) % 4
    if phase == 1:
        services[8443] = HTTPS
    elif phase == 2:
        del services[80]
    elif phase == 3:
        services[22] = SSH_NEW
    if rng.random() < 0.15:
        port = rng.choice([22, 80, 443, 9000])
        if port in services:
            del services[port]
        else:
            services[port] = HTTP
    if 22 in services and rng.random() < 0.05:
        services[22] = UNKNOWN_SERVICE
    return make_scan(host, i, services)


SCRIPT: tuple[dict[int, ServiceIdentity], ...] = (
    {22: SSH},
    {22: SSH, 8080: HTTP},
    {22: SSH, 8080: HTTP},
    {22: SSH, 8080: HTTP},
)


def script_scan(host: str, i: int) -> HostScan:
    return make_scan(host, i, SCRIPT[i])


def sequence(scenario: str) -> Iterator[tuple[str, HostScan]]:
    """Scans in the order a writer records them."""
    if scenario == "script":
        for i in range(len(SCRIPT)):
            yield "delta", script_scan("delta", i)
        return
    i = 0
    while True:
        for host in HOSTS:
            yield host, random_scan(host, i)
        i += 1


def step_scan(state: HostState, scan: HostScan) -> Transition:
    return step(
        state, scan, expected_open=EXPECTED.get(scan.host), scanned_ports=SCANNED, confirmations=2
    )


def write(store: Store, scenario: str, limit: int, stop_after: int = -1) -> int:
    """Record the scenario's scans not yet in the store, up to `limit` scans in all.

    After recording `stop_after` scans in this call, says "ready" and waits to be killed.
    """
    states = store.load_states()
    recorded = 0
    for n, (host, scan) in enumerate(sequence(scenario)):
        if n >= limit:
            break
        state = states.get(host, HostState.initial(host))
        if state.last_scan is not None and state.last_scan.started >= scan.scan.started:
            continue
        transition = step_scan(state, scan)
        assert store.record_scan(scan, transition)
        states[host] = transition.new_state
        recorded += 1
        if recorded == stop_after:
            print("ready", flush=True)
            time.sleep(120)
    return recorded


def writer_main(argv: list[str]) -> int:
    path, scenario, limit = Path(argv[0]), argv[1], int(argv[2])
    stop_after = int(argv[3]) if len(argv) > 3 else -1
    with Store.open(path) as store:
        print("started", flush=True)
        write(store, scenario, limit, stop_after)
    print("done", flush=True)
    return 0


def start_writer(
    path: Path, scenario: str, limit: int, stop_after: int = -1
) -> subprocess.Popen[str]:
    args = [sys.executable, __file__, "writer", str(path), scenario, str(limit), str(stop_after)]
    return subprocess.Popen(args, env=WRITER_ENV, stdout=subprocess.PIPE, text=True)


def kill_when_ready(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(path)
    try:
        return {
            "hosts": conn.execute("SELECT * FROM hosts ORDER BY host").fetchall(),
            "scans": conn.execute("SELECT * FROM scans ORDER BY id").fetchall(),
            "events": conn.execute("SELECT * FROM events ORDER BY id").fetchall(),
            "intervals": conn.execute("SELECT * FROM intervals ORDER BY id").fetchall(),
        }
    finally:
        conn.close()


def check_whole(path: Path) -> int:
    """Integrity and self-consistency of a database after a crash; returns the scans count."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        ids = [r[0] for r in conn.execute("SELECT id FROM scans ORDER BY id")]
        assert ids == list(range(1, len(ids) + 1)), "a scan is missing in the middle"
        per_scan = conn.execute(
            """SELECT s.id, s.events, count(e.id) FROM scans s
               LEFT JOIN events e ON e.scan_id = s.id GROUP BY s.id"""
        ).fetchall()
        assert all(declared == found for _, declared, found in per_scan), "half-written scan"
        duplicates = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM events GROUP BY host, at, port, kind, resolved"
            " HAVING count(*) > 1)"
        ).fetchone()[0]
        assert duplicates == 0
        for host, text in conn.execute("SELECT host, state FROM hosts"):
            latest = conn.execute(
                "SELECT max(started) FROM scans WHERE host = ?", (host,)
            ).fetchone()[0]
            last = decode_state(text).last_scan
            assert last is not None and last.started == latest, "state and scans disagree"
        return len(ids)
    finally:
        conn.close()


class Reference:
    """The transitions of a scenario computed in memory, with no store and no crash."""

    def __init__(self, scenario: str) -> None:
        self._scans = sequence(scenario)
        self._states: dict[str, HostState] = {}
        self._done: list[tuple[str, Transition]] = []

    def first(self, count: int) -> list[tuple[str, Transition]]:
        while len(self._done) < count:
            host, scan = next(self._scans)
            transition = step_scan(self._states.get(host, HostState.initial(host)), scan)
            self._states[host] = transition.new_state
            self._done.append((host, transition))
        return self._done[:count]


def test_kill_9_loses_at_most_the_scan_in_flight(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    rng = random.Random(20240607)
    counts = [0]
    expected = Reference("random")
    for _ in range(20):
        proc = start_writer(db, "random", 40_000)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "started"
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, "the writer finished before being killed"
        count = check_whole(db)
        assert count >= counts[-1]
        counts.append(count)
        # Exactly the first `count` scans are there, with exactly their events and states.
        with Store.open(db) as store:
            states = store.load_states()
            events = [
                (e.event.host, e.event.at, e.event.port, e.event.kind, e.event.resolved)
                for host in HOSTS
                for e in store.history(host, 0.0).events
            ]
        done = expected.first(count)
        wanted = [
            (e.host, e.at, e.port, e.kind, e.resolved)
            for host in HOSTS
            for h, t in done
            if h == host
            for e in t.events
        ]
        assert events == wanted
        for host in HOSTS:
            last = [t.new_state for h, t in done if h == host]
            if last:
                assert encode_state(states[host]) == encode_state(last[-1])
            else:
                assert host not in states
    assert len(set(counts)) > 10, f"the writer made little progress across restarts: {counts}"
    # The crashed database is row for row what one uninterrupted run writes.
    clean = tmp_path / "clean.db"
    with Store.open(clean) as store:
        write(store, "random", counts[-1])
    assert dump(db) == dump(clean)


def test_kill_9_between_sightings_then_restart(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    kill_when_ready(start_writer(db, "script", 99, stop_after=2))  # baseline + first sighting
    with Store.open(db) as store:
        (state,) = store.load_states().values()
    view = port_status(state, 8080)
    assert (view.pending, view.pending_count, view.unexpected_open) == ("PORT_NEW_OPEN", 1, False)

    kill_when_ready(start_writer(db, "script", 99, stop_after=1))  # the confirming scan
    with Store.open(db) as store:
        (state,) = store.load_states().values()
        (confirmed,) = [e.event for e in store.history("delta", 0.0).events][1:]
    assert (confirmed.kind, confirmed.port, confirmed.at) == (
        EventKind.PORT_NEW_OPEN,
        8080,
        T0 + PERIOD * 2 + 2.5,
    )
    view = port_status(state, 8080)
    assert (view.pending, view.unexpected_open) == (None, True)

    kill_when_ready(start_writer(db, "script", 99, stop_after=1))  # one more, after a restart
    with Store.open(db) as store:
        history = store.history("delta", 0.0)
        (state,) = store.load_states().values()
    assert [e.event.kind for e in history.events] == [
        EventKind.BASELINE_LEARNED,
        EventKind.PORT_NEW_OPEN,
    ]
    assert [s.events for s in history.scans] == [1, 0, 1, 0]
    assert port_status(state, 8080).unexpected_open


def record_all(
    store: Store, host: str, specs: Sequence[dict[int, ServiceIdentity] | None]
) -> HostState:
    state = store.load_state(host) or HostState.initial(host)
    start = 0 if state.last_scan is None else round((state.last_scan.started - T0) / PERIOD) + 1
    for i, services in enumerate(specs, start=start):
        scan = make_scan(host, i, services)
        transition = step_scan(state, scan)
        assert store.record_scan(scan, transition)
        state = transition.new_state
    return state


def test_open_creates_a_versioned_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"hosts", "scans", "events", "intervals"}
    finally:
        conn.close()
    Store.open(path).close()  # reopening migrates nothing and keeps the version


def test_migrations_run_in_order_and_atomically(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Store.open(path) as store:
        record_all(store, "alpha", [{22: SSH}])
    broken = (*MIGRATIONS, ("ALTER TABLE scans ADD COLUMN note TEXT", "CREATE TABLE hosts (x)"))
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        Store.open(path, migrations=broken)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        columns = [r[1] for r in conn.execute("PRAGMA table_info(scans)")]
        assert "note" not in columns  # the half-run migration was rolled back
    finally:
        conn.close()
    extended = (*MIGRATIONS, ("ALTER TABLE scans ADD COLUMN note TEXT",))
    with Store.open(path, migrations=extended) as store:
        assert store.hosts() == ["alpha"]
        assert len(store.history("alpha", 0.0).scans) == 1
    with pytest.raises(SchemaTooNewError, match="newer"):
        Store.open(path)


def test_restart_restores_exactly_the_state(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    specs: list[dict[int, ServiceIdentity] | None] = [
        {22: SSH, 443: HTTPS},
        {22: SSH, 443: HTTPS, 8080: HTTP},
        None,
        {22: SSH_NEW, 8080: HTTP},
    ]
    with Store.open(path) as store:
        before = {h: record_all(store, h, specs) for h in HOSTS}
    assert before["alpha"].pending and before["alpha"].in_force
    assert before["gamma"].baseline_source is BaselineSource.EXPECTED
    with Store.open(path) as store:
        after = store.load_states()
        assert after == before
        assert store.hosts() == sorted(HOSTS)
        # Stepping the reloaded state gives the same transition as stepping the old one.
        scan = make_scan("alpha", 4, {22: SSH_NEW, 8080: HTTP})
        assert step_scan(after["alpha"], scan) == step_scan(before["alpha"], scan)
        assert store.record_scan(scan, step_scan(after["alpha"], scan))


def test_recording_a_scan_twice_writes_it_once(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        first = make_scan("alpha", 0, {22: SSH})
        transition = step_scan(HostState.initial("alpha"), first)
        assert store.record_scan(first, transition)
        before = dump(store.path)
        assert not store.record_scan(first, transition)
        assert dump(store.path) == before
        with pytest.raises(ValueError, match="does not belong"):
            store.record_scan(make_scan("alpha", 1, {22: SSH}), transition)


def test_a_transition_from_an_outdated_state_is_refused(tmp_path: Path) -> None:
    """The CLI accepts from another process while the daemon holds the old state in memory."""
    path = tmp_path / "s.db"
    with Store.open(path) as daemon:
        state = record_all(
            daemon, "alpha", [{22: SSH}, {22: SSH, 8080: HTTP}, {22: SSH, 8080: HTTP}]
        )
        assert state.in_force[8080].kind is EventKind.PORT_NEW_OPEN
        assert daemon.poll_changes() == {}
        code = (
            "import sys; from pathlib import Path; from exporter.store import Store\n"
            "with Store.open(Path(sys.argv[1])) as s: s.accept('alpha', 8080, now=1.7e9 + 3000)"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(path)], env=WRITER_ENV, check=True, timeout=30
        )
        scan = make_scan("alpha", 3, {22: SSH, 8080: HTTP})
        with pytest.raises(StaleStateError, match="alpha"):
            daemon.record_scan(scan, step_scan(state, scan))
        changed = daemon.poll_changes()
        assert set(changed) == {"alpha"} and not changed["alpha"].in_force
        assert daemon.poll_changes() == {}
        transition = step_scan(changed["alpha"], scan)
        assert daemon.record_scan(scan, transition)
        assert transition.events == () and 8080 in transition.new_state.baseline
        kinds = [e.event.kind for e in daemon.history("alpha", 0.0).events]
        assert kinds == [
            EventKind.BASELINE_LEARNED,
            EventKind.PORT_NEW_OPEN,
            EventKind.BASELINE_ACCEPTED,
        ]
        assert daemon.poll_changes() == {}  # its own writes are not news


def test_scans_recorded_together_keep_their_own_outcomes(tmp_path: Path) -> None:
    """Scans grouped in one transaction: a stale one writes nothing and the others are kept,
    each exactly as if it had been recorded alone."""
    grouped, alone = tmp_path / "grouped.db", tmp_path / "alone.db"
    with Store.open(grouped) as store, Store.open(alone) as reference:
        states = {h: record_all(store, h, [{22: SSH}]) for h in ("alpha", "beta", "gamma")}
        for h in states:
            record_all(reference, h, [{22: SSH}])
        # Someone else writes beta meanwhile: the state held for it is now outdated.
        other = make_scan("beta", 2, {22: SSH, 443: HTTPS})
        for s in (store, reference):
            assert s.record_scan(other, step_scan(states["beta"], other))
        scans = {h: make_scan(h, 3, {22: SSH, 8080: HTTP}) for h in states}
        batch = [(scans[h], step_scan(states[h], scans[h])) for h in ("alpha", "beta", "gamma")]
        batch.append(batch[0])  # the same scan twice: recorded once
        outcomes = store.record_scans(batch)
        assert outcomes[0] is True and outcomes[2] is True and outcomes[3] is False
        assert isinstance(outcomes[1], StaleStateError)
        for h in ("alpha", "gamma"):
            assert reference.record_scan(scans[h], step_scan(states[h], scans[h]))
        assert store.load_states() == reference.load_states()
        for h in states:
            assert store.history(h, 0.0) == reference.history(h, 0.0)


def test_accept_through_the_store(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        record_all(store, "alpha", [{22: SSH}, {22: SSH_NEW}, {22: SSH_NEW}])
        record_all(store, "gamma", [{22: SSH, 80: HTTP}])
        state = store.accept("alpha", now=T0 + 5000)
        assert state.baseline == {22: SSH_NEW.fingerprint} and not state.in_force
        assert store.load_state("alpha") == state
        (event,) = [e for e in store.history("alpha", T0 + 4000).events]
        assert (event.scan_id, event.event.kind, event.event.port) == (
            None,
            EventKind.BASELINE_ACCEPTED,
            22,
        )
        assert (event.event.old_service, event.event.new_service) == (
            SSH.fingerprint,
            SSH_NEW.fingerprint,
        )
        with pytest.raises(AcceptRefused, match="expected-open"):
            store.accept("gamma", now=T0)
        with pytest.raises(AcceptRefused, match="unknown to the store"):
            store.accept("nosuchhost", now=T0)
        # A refused accept wrote nothing.
        assert [e.event.kind for e in store.history("gamma", 0.0).events] == []


def test_record_transition_of_a_reload(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        state = record_all(store, "gamma", [{22: SSH, 80: HTTP, 8080: HTTP}] * 2)
        assert state.in_force[8080].kind is EventKind.PORT_NEW_OPEN
        transition = reconfigure(state, (22, 80, 8080), at=T0 + 9999)
        store.record_transition(transition, now=T0 + 9999)
        assert store.load_state("gamma") == transition.new_state
        assert [e.event.resolved for e in store.history("gamma", T0 + 9999).events] == [True]
        with pytest.raises(StaleStateError):
            store.record_transition(transition, now=T0 + 10000)
        # `accept` done in memory and persisted the same way.
        alpha = record_all(store, "alpha", [{22: SSH}])
        store.record_transition(accept(alpha, 22, at=T0 + 5), now=T0 + 5)


def test_timeline_is_compact_intervals(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        record_all(
            store,
            "alpha",
            [
                {22: SSH, 443: HTTPS},  # 0
                {22: SSH, 443: HTTPS},  # 1
                None,  # 2: unreachable closes nothing
                {22: UNKNOWN_SERVICE, 443: HTTPS},  # 3: unidentified extends ssh
                {22: SSH_NEW, 443: HTTPS},  # 4: another ssh: new interval
                {22: SSH_NEW},  # 5: 443 closed
                {22: SSH_NEW, 443: HTTPS},  # 6: 443 back
            ],
        )
        at = [T0 + PERIOD * i + 2.5 for i in range(7)]
        intervals = store.history("alpha", 0.0).intervals
        got = [(v.port, v.service, v.version, v.start, v.last_seen, v.end) for v in intervals]
        assert got == [
            (22, "ssh", "9.2p1", at[0], at[3], at[4]),
            (22, "ssh", "9.6p1", at[4], at[6], None),
            (443, "https", "1.22.1", at[0], at[4], at[5]),
            (443, "https", "1.22.1", at[6], at[6], None),
        ]
        assert intervals[2].tls_sha256 == TLS.sha256 and intervals[0].tls_sha256 is None
        # A window selects the intervals overlapping it, and the scans and events inside it.
        window = store.history("alpha", at[5] - 1, at[5] + 1)
        assert [(v.port, v.start) for v in window.intervals] == [(22, at[4]), (443, at[0])]
        assert [s.started for s in window.scans] == [T0 + PERIOD * 5]
        assert [s.result for s in store.history("alpha", 0.0).scans].count("unreachable") == 1


def test_timeline_keeps_ports_that_were_not_probed(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        scan = make_scan("alpha", 0, {22: SSH, 8443: HTTPS})
        store.record_scan(scan, step_scan(HostState.initial("alpha"), scan))
        state = store.load_state("alpha")
        assert state is not None
        narrow = make_scan("alpha", 1, {22: SSH})
        transition = step(state, narrow, expected_open=None, scanned_ports=range(1, 1025))
        store.record_scan(narrow, transition)
        ends = {v.port: v.end for v in store.history("alpha", 0.0).intervals}
        assert ends == {22: None, 8443: None}


def test_prune_forgets_old_history_but_not_state(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        state = record_all(store, "alpha", [{22: SSH, 80: HTTP}] * 3 + [{22: SSH}] * 3)
        cutoff = T0 + PERIOD * 4
        result = store.prune(cutoff)
        assert (result.scans, result.events, result.intervals) == (4, 1, 1)
        history = store.history("alpha", 0.0)
        assert [s.started for s in history.scans] == [T0 + PERIOD * 4, T0 + PERIOD * 5]
        assert [e.event.kind for e in history.events] == [EventKind.PORT_NOW_CLOSED]
        assert [(v.port, v.end) for v in history.intervals] == [(22, None)]
        assert store.load_state("alpha") == state
        assert store.prune(cutoff) == type(result)(0, 0, 0)


def test_a_second_writer_waits_for_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store.open(path).close()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        with Store.open(path, busy_timeout=5.0) as store:
            began = time.monotonic()
            record_all(store, "alpha", [{22: SSH}])
            assert time.monotonic() - began >= 0.2
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):  # noqa: SIM117
            with Store.open(path, busy_timeout=0.1) as store:
                record_all(store, "alpha", [{22: SSH}])
        other.execute("COMMIT")
    finally:
        release.cancel()
        other.close()


def test_codec_round_trips_and_is_canonical() -> None:
    rng = random.Random(7)
    state = HostState.initial("alpha")
    for i in range(300):
        state = step_scan(state, random_scan("alpha", i)).new_state
        text = encode_state(state)
        assert decode_state(text) == state
        assert encode_state(decode_state(text)) == text
        if rng.random() < 0.1 and state.baseline_source is BaselineSource.LEARNED:
            state = accept(state, at=T0 + PERIOD * i + 1).new_state
    # Integer times encode like the floats they are.
    integral = make_scan("beta", 0, {22: SSH})
    integral = HostScan(
        ScanResult("beta", "192.0.2.7", 1_700_000_000, 3, 10, True, open=(22,)), integral.services
    )
    int_state = step(
        HostState.initial("beta"), integral, expected_open=None, scanned_ports=SCANNED
    ).new_state
    assert encode_state(decode_state(encode_state(int_state))) == encode_state(int_state)
    with pytest.raises(CodecError):
        decode_state('{"format": 99}')
    with pytest.raises(CodecError):
        decode_state("not json")


# --- schema 2: fingerprints stored as encode_fingerprint arrays ----------------------------------

PIPED = ServiceIdentity("http", "Acme | Gateway", "2")  # a "|" in the product: the split is right
PIPED_NEW = ServiceIdentity("http", "Acme | Gateway", "3")
AMBIGUOUS = ServiceIdentity("http", "a", "b|")  # version 1 spelled it like COLLIDING
COLLIDING = ServiceIdentity("http", "a|b", "")
FTP = ServiceIdentity("ftp", "vsftpd", "3.0.3")
# Histories that version 1 could have written too: identities whose `|`-joined strings are equal
# never meet on one port (version 1 saw no change between them).
MIGRATED: dict[str, list[dict[int, ServiceIdentity] | None]] = {
    "alpha": [
        {21: FTP, 22: SSH, 80: PIPED, 443: HTTPS, 8080: AMBIGUOUS},
        {22: SSH_NEW, 80: PIPED, 443: HTTPS, 8080: AMBIGUOUS, 9000: COLLIDING},
        None,
        {22: SSH_NEW, 80: PIPED, 443: HTTPS, 8080: AMBIGUOUS, 9000: COLLIDING},
        {22: SSH, 80: PIPED_NEW, 443: HTTPS, 8080: AMBIGUOUS, 9000: COLLIDING},
    ],
    "beta": [{22: SSH, 80: PIPED, 8080: AMBIGUOUS, 8443: HTTPS, 9000: COLLIDING}],
    "gamma": [{22: SSH}, {22: SSH, 80: COLLIDING, 8080: AMBIGUOUS}],
}


def v1_fingerprint(fingerprint: str | None) -> str | None:
    """What version 1 stored for a fingerprint: the fields joined with "|"."""
    return None if fingerprint is None else "|".join(decode_fingerprint(fingerprint))


def write_version_1(path: Path) -> None:
    """A database at schema version 1 holding what version 1 wrote for MIGRATED.

    The scans are recorded by this version on the version 1 schema, then every fingerprint is
    rewritten the way version 1 spelled it (and the host states get their format 1 back):
    version 1 differed from this one in nothing else it stored.
    """
    with Store.open(path, migrations=MIGRATIONS[:1]) as store:
        for host, specs in MIGRATED.items():
            record_all(store, host, specs)
    conn = sqlite3.connect(path)
    try:
        with conn:
            for host, text in conn.execute("SELECT host, state FROM hosts").fetchall():
                state = json.loads(text)
                state["format"] = 1
                state["baseline"] = {p: v1_fingerprint(f) for p, f in state["baseline"].items()}
                for pending in state["pending"].values():
                    pending["service"] = v1_fingerprint(pending["service"])
                for change in state["in_force"].values():
                    change["old"] = v1_fingerprint(change["old"])
                    change["new"] = v1_fingerprint(change["new"])
                conn.execute(
                    "UPDATE hosts SET state = ? WHERE host = ?",
                    (json.dumps(state, sort_keys=True, separators=(",", ":")), host),
                )
            for event_id, old, new in conn.execute(
                "SELECT id, old_service, new_service FROM events"
            ).fetchall():
                conn.execute(
                    "UPDATE events SET old_service = ?, new_service = ? WHERE id = ?",
                    (v1_fingerprint(old), v1_fingerprint(new), event_id),
                )
            for interval_id, fingerprint in conn.execute(
                "SELECT id, fingerprint FROM intervals"
            ).fetchall():
                conn.execute(
                    "UPDATE intervals SET fingerprint = ? WHERE id = ?",
                    (v1_fingerprint(fingerprint), interval_id),
                )
    finally:
        conn.close()


# Old strings that no identity on record explains, and how migration 2 reads them: the split
# the JSON API used (service before the first "|", certificate after the last, version after
# the last remaining one). The last row is the reading that is wrong when a version held "|".
UNEXPLAINED = [
    ("ftp|vsftpd|2.3.4|", ("ftp", "vsftpd", "2.3.4", "")),
    ("http|Acme | Gateway|1|", ("http", "Acme | Gateway", "1", "")),
    ("https|nginx|1.24|" + "cd" * 32, ("https", "nginx", "1.24", "cd" * 32)),
    ("unknown|||", ("unknown", "", "", "")),
    ("http|x|y|z|", ("http", "x|y", "z", "")),
]


def test_migration_2_rewrites_every_stored_fingerprint(tmp_path: Path) -> None:
    old = tmp_path / "v1.db"
    write_version_1(old)
    conn = sqlite3.connect(old)
    try:
        with conn:
            conn.executemany(  # events of a host that is gone, with nothing else to go by
                """INSERT INTO events (at, host, port, kind, severity, old_service, new_service,
                                       resolved)
                   VALUES (?, 'retired', 21, 'PORT_SERVICE_CHANGED', 'medium', ?, NULL, 0)""",
                [(T0 + i, text) for i, (text, _) in enumerate(UNEXPLAINED)],
            )
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        stored = {r[0] for r in conn.execute("SELECT old_service FROM events WHERE host = 'alpha'")}
        assert "ssh|OpenSSH|9.2p1|" in stored  # the test starts from the old spelling
        assert (
            "http|a|b||"
            in conn.execute("SELECT state FROM hosts WHERE host = 'beta'").fetchone()[0]
        )
    finally:
        conn.close()

    Store.open(old).close()

    # Row for row what this version writes for the same scans.
    new = tmp_path / "v2.db"
    with Store.open(new) as store:
        for host, specs in MIGRATED.items():
            record_all(store, host, specs)
    migrated = dump(old)
    retired = [row for row in migrated["events"] if row[3] == "retired"]
    migrated["events"] = [row for row in migrated["events"] if row[3] != "retired"]
    assert migrated == dump(new)
    assert [(row[7], row[8]) for row in retired] == [
        (encode_fingerprint(*fields), None) for _, fields in UNEXPLAINED
    ]
    conn = sqlite3.connect(old)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 2
        for (text,) in conn.execute("SELECT state FROM hosts"):
            assert encode_state(decode_state(text)) == text  # canonical: no StaleStateError
    finally:
        conn.close()

    # The baseline read back is the fingerprint the same identity has now: the next scans of
    # unchanged services start nothing, also where the old string was ambiguous (port 8080).
    with Store.open(old) as store:
        beta = record_all(store, "beta", [MIGRATED["beta"][0]] * 2)
        assert beta.baseline[8080] == AMBIGUOUS.fingerprint
        assert beta.baseline[9000] == COLLIDING.fingerprint
        assert not beta.pending and not beta.in_force
        alpha = store.load_state("alpha")
        assert alpha is not None and alpha.pending[80].target.service == PIPED_NEW.fingerprint
        alpha = record_all(store, "alpha", [MIGRATED["alpha"][-1]])
        kinds = [
            (e.event.port, e.event.kind, e.event.resolved)
            for e in store.history("alpha", T0 + PERIOD * 5).events
        ]
        assert kinds == [
            (22, EventKind.PORT_SERVICE_CHANGED, True),  # the pending return to ssh 9.2p1
            (80, EventKind.PORT_SERVICE_CHANGED, False),  # the pending change to version 3
        ]
        assert 8080 not in alpha.pending and 9000 not in alpha.pending
        assert [e.event.kind for e in store.history("beta", T0 + PERIOD).events] == []


def test_migration_2_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    write_version_1(path)
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(
                "INSERT INTO hosts VALUES ('broken', ?, 1, 0.0)",
                (json.dumps({"format": 7, "host": "broken"}),),
            )
        before = dump(path)
    finally:
        conn.close()
    with pytest.raises(CodecError, match="broken: unknown host state format 7"):
        Store.open(path)
    assert dump(path) == before
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        with conn:
            conn.execute("DELETE FROM hosts WHERE host = 'broken'")
    finally:
        conn.close()
    with Store.open(path) as store:
        assert set(store.load_states()) == set(MIGRATED)


def hang_in_migration_main(argv: list[str]) -> int:
    """Run migration 2 on the database at argv[0], say "ready" before committing, and wait."""

    def migrate_then_hang(conn: sqlite3.Connection) -> None:
        for migration_step in MIGRATIONS[1]:
            if isinstance(migration_step, str):
                conn.execute(migration_step)
            else:
                migration_step(conn)
        print("ready", flush=True)
        time.sleep(120)

    print("started", flush=True)
    Store.open(Path(argv[0]), migrations=(*MIGRATIONS[:1], (migrate_then_hang,)))
    return 1


def test_kill_9_during_migration_2_keeps_version_1(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    write_version_1(path)
    before = dump(path)
    args = [sys.executable, __file__, "hang-in-migration", str(path)]
    kill_when_ready(subprocess.Popen(args, env=WRITER_ENV, stdout=subprocess.PIPE, text=True))
    assert dump(path) == before  # nothing of the killed migration is left
    with Store.open(path) as store:  # and the next open runs it whole
        beta = store.load_state("beta")
        assert beta is not None and beta.baseline[8080] == AMBIGUOUS.fingerprint


def test_history_table_names_services_for_people(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        record_all(store, "alpha", [{22: SSH, 443: HTTPS}] + [{22: SSH_NEW, 443: HTTPS}] * 2)
        table = history_table("alpha", store.history("alpha", 0.0), 0.0)
    assert "ssh OpenSSH 9.2p1 -> ssh OpenSSH 9.6p1" in table
    assert "443/tcp   2023-11-14 22:13:22  now                  https nginx 1.22.1" in table
    assert "[" not in table and "|" not in table


# -- one daemon per store, and the file under a running daemon ---------------------------------


def hold_exclusive_main(argv: list[str]) -> int:
    """Open the store at argv[0] as the daemon does, say "ready" and wait to be killed."""
    with Store.open(Path(argv[0]), exclusive=True) as store:
        record_all(store, "alpha", [{22: SSH}])
        print("ready", flush=True)
        time.sleep(120)
    return 1


def test_a_second_daemon_on_the_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with Store.open(path, exclusive=True) as daemon:
        assert daemon.exclusive
        assert lock_path(path) == tmp_path / "state.sqlite.lock"
        assert lock_path(path).read_text() == f"{os.getpid()}\n"
        with pytest.raises(StoreInUseError) as refused:
            Store.open(path, exclusive=True)
        message = str(refused.value)
        assert message.startswith(f"{path}: the store is in use by another portscan-exporter")
        assert f"process {os.getpid()} holds {lock_path(path)}" in message
        assert isinstance(refused.value, OSError)
        assert (refused.value.pid, refused.value.path) == (os.getpid(), path)
        # The CLI opens beside the daemon, reads, and accepts (a write the daemon then sees).
        record_all(daemon, "alpha", [{22: SSH}, {22: SSH_NEW}, {22: SSH_NEW}])
        with Store.open(path) as cli:
            assert not cli.exclusive and not cli.created
            assert len(cli.history("alpha", 0.0).scans) == 3
            cli.accept("alpha", now=T0 + 5000)
        assert set(daemon.poll_changes()) == {"alpha"}
    # Closing released the lock, and the lock file stays for the next daemon.
    assert lock_path(path).exists()
    with Store.open(path, exclusive=True) as daemon:
        assert daemon.load_state("alpha") is not None


def test_the_lock_dies_with_a_daemon_killed_with_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    args = [sys.executable, __file__, "hold-exclusive", str(path)]
    holder = subprocess.Popen(args, env=WRITER_ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreInUseError, match=f"process {holder.pid} holds") as refused:
            Store.open(path, exclusive=True)
        assert refused.value.pid == holder.pid
        with Store.open(path) as cli:  # the CLI works while that daemon runs
            assert cli.hosts() == ["alpha"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    assert holder.returncode == -signal.SIGKILL
    with Store.open(path, exclusive=True) as daemon:
        assert daemon.hosts() == ["alpha"] and not daemon.created
        assert lock_path(path).read_text() == f"{os.getpid()}\n"


def test_created_tells_a_new_store_from_an_existing_one(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with Store.open(path, exclusive=True) as store:
        assert store.created
    with Store.open(path, exclusive=True) as store:
        assert not store.created
    with Store.open(path) as store:
        assert not store.created
    empty = tmp_path / "empty.sqlite"
    empty.touch()  # a file with no schema holds no state either
    with Store.open(empty) as store:
        assert store.created


def test_writes_to_a_deleted_store_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with Store.open(path, exclusive=True) as store:
        state = record_all(store, "alpha", [{22: SSH}, {22: SSH_NEW}, {22: SSH_NEW}])
        events = store.history("alpha", 0.0).events
        assert store.check_identity() is None
        path.unlink()
        problem = store.check_identity()
        assert problem is not None
        assert problem.startswith(f"{path}: the store file was deleted or moved away")
        with pytest.raises(StoreReplacedError, match="deleted or moved away") as refused:
            record_all(store, "alpha", [{22: SSH_NEW}])
        assert str(refused.value) == problem
        scan = make_scan("beta", 0, {22: SSH})
        with pytest.raises(StoreReplacedError):
            store.record_scan(scan, step_scan(HostState.initial("beta"), scan))
        with pytest.raises(StoreReplacedError):
            store.accept("alpha", now=T0 + 5000)
        with pytest.raises(StoreReplacedError):
            store.record_transition(reconfigure(state, expected_open=(22,), at=T0), now=T0)
        with pytest.raises(StoreReplacedError):
            store.prune(T0 + 1e9)
        # Nothing reached the orphaned file; it still reads as it was.
        assert store.load_states() == {"alpha": state}
        assert len(store.history("alpha", 0.0).scans) == 3
        assert store.history("alpha", 0.0).events == events
        assert not path.exists() and Path(f"{path}-wal").stat().st_size == 0
    # The next start finds no store, and says so.
    with Store.open(path, exclusive=True) as store:
        assert store.created and store.hosts() == []


def test_writes_to_a_replaced_store_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with Store.open(tmp_path / "other.sqlite") as other:
        record_all(other, "zeta", [{80: HTTP}])
    with Store.open(path, exclusive=True) as store:
        state = record_all(store, "alpha", [{22: SSH}])
        events = store.history("alpha", 0.0).events
        os.replace(tmp_path / "other.sqlite", path)  # a restored backup, a careless mv
        replacement = path.read_bytes()
        problem = store.check_identity()
        assert problem is not None and problem.startswith(f"{path}: the store file was replaced")
        with pytest.raises(StoreReplacedError, match="replaced while in use"):
            record_all(store, "alpha", [{22: SSH_NEW}])
        assert path.read_bytes() == replacement
        assert store.load_states() == {"alpha": state}
        assert store.history("alpha", 0.0).events == events
        # The orphan's write-ahead log, still named state.sqlite-wal, was emptied, so that it is
        # not replayed onto the replacement by whoever opens the path now.
        assert Path(f"{path}-wal").stat().st_size == 0
        with Store.open(path) as cli:
            assert cli.hosts() == ["zeta"]
    # The replacement is intact after the orphan closed, and is what the next start opens.
    with Store.open(path, exclusive=True) as store:
        assert store.hosts() == ["zeta"] and not store.created


if __name__ == "__main__" and sys.argv[1:2] == ["writer"]:
    sys.exit(writer_main(sys.argv[2:]))
if __name__ == "__main__" and sys.argv[1:2] == ["hang-in-migration"]:
    sys.exit(hang_in_migration_main(sys.argv[2:]))
if __name__ == "__main__" and sys.argv[1:2] == ["hold-exclusive"]:
    sys.exit(hold_exclusive_main(sys.argv[2:]))
