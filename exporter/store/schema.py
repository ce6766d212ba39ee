"""The database schema as an ordered list of migrations.

`PRAGMA user_version` holds how many have been applied. A migration is appended, never
edited: a database at version N runs migrations N+1.. on open, each in one transaction.
"""

from __future__ import annotations

Migration = tuple[str, ...]

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
)
