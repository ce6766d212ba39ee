"""The database schema as an ordered list of migrations.

`PRAGMA user_version` holds how many have been applied. A migration is appended, never
edited: a database at version N runs migrations N+1.. on open, all of them in one transaction,
so a crash or an error part-way leaves the file exactly as it was. A step is an SQL statement,
or a function of the connection for rewrites SQL cannot express (re-encoding values); such a
function only reads and writes through the connection it is given, inside that transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from exporter.model import FingerprintFields, encode_fingerprint

from .codec import CodecError, dumps

Step = str | Callable[[sqlite3.Connection], None]
Migration = tuple[Step, ...]


# -- 2: unambiguous service fingerprints ---------------------------------------------------------
#
# Version 1 wrote a fingerprint as `service|product|version|cert-sha256` with nothing escaped,
# so product `a|b` without a version and product `a` with version `b|` were the same string.
# Version 2 writes `encode_fingerprint` (a JSON array) wherever one is persisted: the baseline,
# pending service changes and changes in force inside each host's state (whose `format` goes
# from 1 to 2, so that a state is never read with the wrong meaning), the old/new service of
# events, and the fingerprint of timeline intervals.
#
# An old string is ambiguous only where a field held a `|`. It is read, best first, as:
# 1. An interval row: rebuilt from the interval's own service/product/version/tls_sha256
#    columns, which hold the identity exactly.
# 2. The identity the string must have come from, where the state says which: a change in
#    force names the confirmed identity of its port as `new`; a baseline with no change in
#    force is that confirmed identity too; a pending service change names the identity its
#    port was last observed with. Reading these exactly keeps a state consistent with itself
#    (the state machine checks that the changes in force follow from baseline and confirmed
#    identities) and makes the next scan of an unchanged service match its baseline.
# 3. The identities the timeline recorded on the same host and port (for events, and for a
#    baseline whose service has since changed), then every identity known whole (intervals,
#    confirmed and observed identities of all hosts): used when exactly one of them has that
#    old string.
# 4. Otherwise the split the JSON API applied to version 1 strings: the service is before the
#    first `|` and the certificate hash after the last (service names are plain words and the
#    hash is hex: neither ever held a `|`), and the version is after the last remaining `|`.
#    Product names are free text copied from the signatures and do contain a `|` now and then;
#    versions are short tokens that practically never do. This reading is wrong only for a
#    version containing `|`, and only for strings no identity on record explains; for a baseline
#    that means the next scan of the port starts a service change that was none, the safe side
#    of the mistake: nothing goes unreported.
#
# `encode_fingerprint` is the version 2 encoding. Should it ever change, a new migration
# converts from this one, and a copy of today's encoder replaces it here.

_V1_STATE_FORMAT = 1
_V2_STATE_FORMAT = 2


def _v1_fingerprint(fields: Iterable[str]) -> str:
    return "|".join(fields)


def _split_v1_fingerprint(old: str) -> FingerprintFields:
    service, _, rest = old.partition("|")
    middle, _, cert = rest.rpartition("|")
    product, _, version = middle.rpartition("|")
    return FingerprintFields(service, product, version, cert)


def _identity_fields(identity: Mapping[str, Any] | None) -> list[FingerprintFields]:
    """The fingerprint fields of an identity as host state format 1 stores it; [] for None."""
    if identity is None:
        return []
    tls = identity["tls"]
    cert = "" if tls is None else tls["sha256"]
    return [FingerprintFields(identity["service"], identity["product"], identity["version"], cert)]


class _V1Reader:
    """Reads version 1 fingerprints as described above (steps 2 to 4)."""

    def __init__(self, timeline: Iterable[tuple[str, int, FingerprintFields]]) -> None:
        # old string -> the identities that had it, on one host and port and anywhere
        self._by_port: dict[tuple[str, int, str], set[FingerprintFields]] = {}
        self._everywhere: dict[str, set[FingerprintFields]] = {}
        for host, port, fields in timeline:
            self._by_port.setdefault((host, port, _v1_fingerprint(fields)), set()).add(fields)
            self.learn([fields])

    def learn(self, identities: Iterable[FingerprintFields]) -> None:
        for fields in identities:
            self._everywhere.setdefault(_v1_fingerprint(fields), set()).add(fields)

    def convert(
        self, old: str | None, host: str, port: int | None, source: Iterable[FingerprintFields]
    ) -> str | None:
        """`old` as version 2; `source`: the identities it was made from, if the state says."""
        if old is None:
            return None
        nearby = () if port is None else self._by_port.get((host, port, old), ())
        for candidates in (source, nearby, self._everywhere.get(old, ())):
            matches = {fields for fields in candidates if _v1_fingerprint(fields) == old}
            if len(matches) == 1:
                return encode_fingerprint(*matches.pop())
        return encode_fingerprint(*_split_v1_fingerprint(old))


def _convert_state(state: dict[str, Any], reader: _V1Reader) -> None:
    host = state["host"]
    confirmed = state["confirmed"]
    for key, old in state["baseline"].items():
        source = [] if key in state["in_force"] else _identity_fields(confirmed.get(key))
        state["baseline"][key] = reader.convert(old, host, int(key), source)
    for key, pending in state["pending"].items():
        source = _identity_fields(pending["observed"])
        pending["service"] = reader.convert(pending["service"], host, int(key), source)
    for key, change in state["in_force"].items():
        # `old` is the baseline's, read exactly as the baseline is just above.
        change["old"] = reader.convert(change["old"], host, int(key), [])
        source = _identity_fields(confirmed.get(key))
        change["new"] = reader.convert(change["new"], host, int(key), source)
    state["format"] = _V2_STATE_FORMAT


def _fingerprints_as_json_arrays(conn: sqlite3.Connection) -> None:
    intervals = [
        (interval_id, host, port, FingerprintFields(*fields))
        for interval_id, host, port, *fields in conn.execute(
            """SELECT id, host, port, service, product, version, coalesce(tls_sha256, '')
               FROM intervals"""
        )
    ]
    reader = _V1Reader((host, port, fields) for _, host, port, fields in intervals)
    states: dict[str, dict[str, Any]] = {}
    for host, text in conn.execute("SELECT host, state FROM hosts"):
        state = json.loads(text)
        if state.get("format") != _V1_STATE_FORMAT:
            raise CodecError(f"host {host}: unknown host state format {state.get('format')!r}")
        states[host] = state
        for identity in state["confirmed"].values():
            reader.learn(_identity_fields(identity))
        for pending in state["pending"].values():
            reader.learn(_identity_fields(pending["observed"]))
    for state in states.values():
        _convert_state(state, reader)
    conn.executemany(
        "UPDATE hosts SET state = ? WHERE host = ?",
        [(dumps(state), host) for host, state in states.items()],
    )
    events = conn.execute(
        """SELECT id, host, port, old_service, new_service FROM events
           WHERE old_service IS NOT NULL OR new_service IS NOT NULL"""
    ).fetchall()
    conn.executemany(
        "UPDATE events SET old_service = ?, new_service = ? WHERE id = ?",
        [
            (reader.convert(old, host, port, []), reader.convert(new, host, port, []), event_id)
            for event_id, host, port, old, new in events
        ],
    )
    conn.executemany(
        "UPDATE intervals SET fingerprint = ? WHERE id = ?",
        [(encode_fingerprint(*fields), interval_id) for interval_id, _, _, fields in intervals],
    )


MIGRATIONS: tuple[Migration, ...] = (
    # 1: the first schema
    (
        # One row per host: the state machine's HostState as canonical JSON (see codec), bumped
        # `revision` on every write so that other processes can notice changes cheaply.
        """CREATE TABLE hosts (
            host TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            revision INTEGER NOT NULL,
            updated REAL NOT NULL
        ) WITHOUT ROWID""",
        # `events` is how many event rows the scan wrote: a whole scan is checkable on its own.
        """CREATE TABLE scans (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            started REAL NOT NULL,
            finished REAL NOT NULL,
            result TEXT NOT NULL,
            address TEXT,
            ports_scanned INTEGER NOT NULL,
            open_ports INTEGER NOT NULL,
            probes_sent INTEGER NOT NULL,
            error TEXT,
            events INTEGER NOT NULL,
            UNIQUE (host, started)
        )""",
        "CREATE INDEX scans_finished ON scans (finished)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            scan_id INTEGER REFERENCES scans (id) ON DELETE SET NULL,
            at REAL NOT NULL,
            host TEXT NOT NULL,
            port INTEGER,
            kind TEXT NOT NULL,
            severity TEXT NOT NULL,
            old_service TEXT,
            new_service TEXT,
            resolved INTEGER NOT NULL
        )""",
        "CREATE INDEX events_host_at ON events (host, at)",
        "CREATE INDEX events_at ON events (at)",
        "CREATE INDEX events_scan ON events (scan_id)",
        # The observed timeline: port P answered with service S from start_at until end_at
        # (NULL while it still does). `last_seen` is the last scan that saw it.
        """CREATE TABLE intervals (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            port INTEGER NOT NULL,
            fingerprint TEXT NOT NULL,
            service TEXT NOT NULL,
            product TEXT NOT NULL,
            version TEXT NOT NULL,
            tls_sha256 TEXT,
            start_at REAL NOT NULL,
            last_seen REAL NOT NULL,
            end_at REAL
        )""",
        "CREATE UNIQUE INDEX intervals_current ON intervals (host, port) WHERE end_at IS NULL",
        "CREATE INDEX intervals_host_start ON intervals (host, start_at)",
        "CREATE INDEX intervals_end ON intervals (end_at)",
    ),
    # 2: fingerprints as `encode_fingerprint` writes them (see above)
    (_fingerprints_as_json_arrays,),
)
