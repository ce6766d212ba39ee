"""`Fingerprinter`: service identification with one signature database and one set of limits.

Build it once, at start-up or on a configuration reload, from the options (`load` reads the
built-in database and, when the options point at it, nmap's), then ask it about ports:

    fingerprinter = Fingerprinter.load(options)
    result = await fingerprinter.identify("192.0.2.10", 443, server_name="www.example.org")
    services = await fingerprinter.identify_scanned(scan_result)

It keeps no state between calls, so one object serves any number of scans at once. Each port
is identified by its own `session.Session` under its own deadline and byte allowance; ports
run concurrently up to `options.concurrency`, or under a `limiter` the caller shares between
hosts. A failure on one port (even a bug) gives that port an "unknown" identity and never
costs the others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..model import UNKNOWN_SERVICE, ScanResult, ServiceIdentity
from .connection import Budget, Dialer, default_dialer
from .sanitize import sanitize
from .session import EXTRA_LIMIT, Session
from .signatures import SignatureDB


@dataclass(frozen=True, slots=True)
class FingerprintOptions:
    """Limits and choices of the identification engine (per port unless said otherwise)."""

    timeout: float = 5.0  # seconds for the whole identification of one port
    max_bytes: int = 16384  # bytes read from one port, all connections together
    concurrency: int = 32  # ports identified at the same time
    nmap_service_probes: Path | None = None  # also use nmap's probe database
    banner_wait: float = 0.5  # wait for a banner where none is expected (within `timeout`)
    intensity: int = 7  # highest rarity of the probes tried on ports they do not name
    starttls: bool = True  # upgrade SMTP/IMAP/POP3/FTP with STARTTLS to read certificates

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")
        if self.max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.banner_wait < 0:
            raise ValueError("banner_wait must not be negative")
        if not 0 <= self.intensity <= 9:
            raise ValueError("intensity must be between 0 and 9")


@dataclass(frozen=True, slots=True)
class Identification:
    """An identity with what it cost to obtain."""

    port: int
    identity: ServiceIdentity
    duration_seconds: float
    bytes_read: int = 0
    probes_sent: int = 0
    connections: int = 0
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class Fingerprinter:
    """Identifies the services on open TCP ports. `dialer` replaces how connections open."""

    db: SignatureDB
    options: FingerprintOptions = field(default_factory=FingerprintOptions)
    dialer: Dialer = default_dialer

    @classmethod
    def load(cls, options: FingerprintOptions, *, dialer: Dialer = default_dialer) -> Fingerprinter:
        """The built-in database, merged with nmap's when `options` points at it.

        Raises `OSError` when the nmap file cannot be read. Loading nmap's file compiles about
        12,000 patterns (a few seconds): do it once, at start-up or reload.
        """
        db = SignatureDB.builtin()
        if options.nmap_service_probes is not None:
            db = db.merged_with_nmap(options.nmap_service_probes)
        return cls(db, options, dialer)

    async def identify(
        self, address: str, port: int, *, server_name: str | None = None
    ) -> Identification:
        """Identify the service on `address`:`port` within the limits of the options.

        `server_name` is the DNS name the host is known by, sent as SNI and in the HTTP
        Host header so that name-based virtual hosts answer as they do for their users.
        """
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.options.timeout
        budget = Budget(deadline=deadline, bytes_left=self.options.max_bytes)
        session = Session(
            address=address,
            port=port,
            db=self.db,
            options=self.options,
            server_name=server_name,
            dialer=self.dialer,
            budget=budget,
        )
        timed_out = await session.run_within_limits()
        return Identification(
            port=port,
            identity=session.identity(),
            duration_seconds=time.monotonic() - started,
            bytes_read=budget.bytes_read,
            probes_sent=budget.probes_sent,
            connections=budget.connections,
            timed_out=timed_out,
        )

    async def identify_ports(
        self,
        address: str,
        ports: Iterable[int],
        *,
        server_name: str | None = None,
        limiter: asyncio.Semaphore | None = None,
    ) -> dict[int, Identification]:
        """Identify several ports of one host concurrently, by port; never raises for one.

        At most `options.concurrency` ports are identified at once, or pass `limiter` to
        share one limit between hosts. A port's time limit starts when its turn comes.
        """
        semaphore = limiter or asyncio.Semaphore(self.options.concurrency)

        async def one(port: int) -> Identification:
            async with semaphore:
                started = time.monotonic()
                try:
                    return await self.identify(address, port, server_name=server_name)
                except Exception as exc:  # a bug for one port must not cost the others
                    return Identification(
                        port=port,
                        identity=ServiceIdentity(
                            service=UNKNOWN_SERVICE.service,
                            extra=sanitize(f"identification failed: {exc!r}", EXTRA_LIMIT),
                        ),
                        duration_seconds=time.monotonic() - started,
                    )

        unique = sorted(set(ports))
        results = await asyncio.gather(*(one(port) for port in unique))
        return dict(zip(unique, results, strict=True))

    async def identify_scanned(
        self, result: ScanResult, *, limiter: asyncio.Semaphore | None = None
    ) -> dict[int, ServiceIdentity]:
        """The services on the open ports of a finished scan ({} when it failed or found none).

        A host scanned by name has that name sent as SNI and in the HTTP Host header.
        """
        if not result.ok or not result.open:
            return {}
        server_name = None if _is_ip(result.host) else result.host
        found = await self.identify_ports(
            result.address or result.host, result.open, server_name=server_name, limiter=limiter
        )
        return {port: identification.identity for port, identification in found.items()}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
