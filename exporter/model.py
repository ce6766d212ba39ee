"""Plain values passed between the layers (scanner -> fingerprint -> state machine -> store).

Nothing here does I/O. Every layer speaks in these types so that each can be tested alone
and the state machine stays a pure function of its inputs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PortState(enum.StrEnum):
    """What a connect attempt learned about one TCP port."""

    OPEN = "open"  # the handshake completed with the target
    CLOSED = "closed"  # the target answered with RST (connection refused)
    FILTERED = "filtered"  # no answer after every attempt (dropped, or ICMP unreachable)


@dataclass(frozen=True, slots=True)
class ScanResult:
    """Outcome of one TCP scan of one host.

    `answered` is False when the host sent nothing at all (no SYN-ACK, no RST) on any port:
    that is an unreachable host, not a host with every port closed. `error` is set when the
    scan could not run (name resolution failed, no usable address); then `answered` is False
    and the port tuples are empty.
    """

    host: str
    address: str | None
    started: float  # wall-clock seconds since the epoch
    duration_seconds: float
    ports_scanned: int
    answered: bool
    open: tuple[int, ...] = ()
    closed: tuple[int, ...] = ()
    filtered: tuple[int, ...] = ()
    error: str | None = None
    probes_sent: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.answered

    def state_of(self, port: int) -> PortState | None:
        if port in self.open:
            return PortState.OPEN
        if port in self.closed:
            return PortState.CLOSED
        if port in self.filtered:
            return PortState.FILTERED
        return None


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What the TLS handshake on a port disclosed."""

    protocol: str  # e.g. "TLSv1.3"
    subject: str  # RFC 4514 string, e.g. "CN=www.example.org"
    issuer: str
    sans: tuple[str, ...]
    not_after: float  # seconds since the epoch; 0 when the certificate could not be decoded
    sha256: str  # lower-case hex of the DER certificate's SHA-256

    def to_json(self) -> dict[str, Any]:
        known = self.not_after > 0
        return {
            "protocol": self.protocol,
            "subject": self.subject,
            "issuer": self.issuer,
            "sans": list(self.sans),
            "not_after": self.not_after if known else None,
            "not_after_rfc3339": rfc3339(self.not_after) if known else None,
            "sha256": self.sha256,
        }


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    """Who answers on an open port.

    Only `service`, `product`, `version` and the certificate fingerprint make up the identity
    compared for PORT_SERVICE_CHANGED (see `fingerprint`); `extra` and `banner` are shown to
    people but may carry volatile text and never count as a change.
    """

    service: str  # "ssh", "http", "https", "smtp", ... or "unknown"
    product: str = ""
    version: str = ""
    extra: str = ""
    tls: TLSInfo | None = None
    banner: str = ""  # sanitized, length-capped

    @property
    def fingerprint(self) -> str:
        cert = self.tls.sha256 if self.tls is not None else ""
        return "|".join((self.service, self.product, self.version, cert))

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "product": self.product,
            "version": self.version,
            "extra": self.extra,
            "banner": self.banner,
            "tls": None if self.tls is None else self.tls.to_json(),
            "fingerprint": self.fingerprint,
        }


UNKNOWN_SERVICE = ServiceIdentity(service="unknown")


@dataclass(frozen=True, slots=True)
class HostScan:
    """A finished scan of one host with the service identified on each open port.

    This is the state machine's input. `services` has an entry for every open port; an open
    port whose service could not be identified maps to `UNKNOWN_SERVICE`.
    """

    scan: ScanResult
    services: dict[int, ServiceIdentity] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.scan.host
