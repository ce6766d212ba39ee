"""Plain values passed between the layers (scanner -> fingerprint -> state machine -> store).

Nothing here does I/O. Every layer speaks in these types so that each can be tested alone
and the state machine stays a pure function of its inputs.

Service fingerprints
--------------------
The identity compared for PORT_SERVICE_CHANGED is four strings (service, product, version,
certificate SHA-256). The state machine compares it and the store persists it as one plain
string, the *fingerprint*: `encode_fingerprint` writes it, `decode_fingerprint` reads it back,
and nothing else builds or takes one apart. The encoding is the compact JSON array
`["ssh","OpenSSH","9.2p1",""]`, ASCII only:

- it is unambiguous: every field is quoted and escaped, so two different identities never
  give the same string (a `|`-joined one did: product `a|b` without a version, and product `a`
  with version `b|`), and equal strings mean equal identities, all the state machine needs;
- it is canonical: one identity has exactly one fingerprint (no optional whitespace, escapes
  fixed by `ensure_ascii`), and `decode_fingerprint` refuses any other spelling;
- being ASCII it survives any text column, even for a lone surrogate from a binary banner;
- it reads as what it is in `sqlite3` and in the JSON API, and SQL can take it apart
  (`json_extract(fingerprint, '$[1]')` is the product).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple


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


class FingerprintFields(NamedTuple):
    """The four fields of a fingerprint, as `decode_fingerprint` gives them back."""

    service: str
    product: str
    version: str
    cert_sha256: str  # "" when the port spoke no TLS


def encode_fingerprint(service: str, product: str, version: str, cert_sha256: str) -> str:
    """The canonical fingerprint of an identity: `["ssh","OpenSSH","9.2p1",""]`."""
    fields = [service, product, version, cert_sha256]
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True)


def decode_fingerprint(fingerprint: str) -> FingerprintFields:
    """The fields of a fingerprint made by `encode_fingerprint`; ValueError for anything else.

    Only the canonical spelling is accepted: a string that decodes but is spelled otherwise
    would compare unequal to the fingerprint of the same identity, so it is an error here
    rather than a phantom service change later.
    """
    try:
        fields = json.loads(fingerprint)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested arrays
        fields = None
    if (
        not isinstance(fields, list)
        or len(fields) != len(FingerprintFields._fields)
        or not all(isinstance(f, str) for f in fields)
        or encode_fingerprint(*fields) != fingerprint
    ):
        raise ValueError(f"not a service fingerprint: {fingerprint!r}")
    return FingerprintFields(*fields)


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    """Who answers on an open port.

    Only `service`, `product`, `version` and the certificate fingerprint make up the identity
    compared for PORT_SERVICE_CHANGED (see `fingerprint`); `extra` and `banner` are shown to
    people but may carry volatile text and never count as a change.
    """

    service: str  # "ssh", "http", "https", "smtp", ... or UNKNOWN_SERVICE.service
    product: str = ""
    version: str = ""
    extra: str = ""
    tls: TLSInfo | None = None
    banner: str = ""  # sanitized, length-capped

    @property
    def fingerprint(self) -> str:
        cert = self.tls.sha256 if self.tls is not None else ""
        return encode_fingerprint(self.service, self.product, self.version, cert)

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


# What an open port that could not be identified answers with; its `service` is the one
# spelling of the unknown service name.
UNKNOWN_SERVICE = ServiceIdentity(service="unknown")


@dataclass(frozen=True, slots=True)
class HostScan:
    """A finished scan of one host with the service identified on each open port.

    This is the state machine's input. `services` has an entry for every open port; an open
    port whose service could not be identified maps to `UNKNOWN_SERVICE`.
    """

    scan: ScanResult
    services: dict[int, ServiceIdentity] = field(default_factory=dict)
    # Time spent identifying the open ports after the TCP scan (scan.duration_seconds is
    # the TCP scan alone): logged beside it, never stored.
    identify_seconds: float = 0.0

    @property
    def host(self) -> str:
        return self.scan.host


def describe_fingerprint(fingerprint: str | None, *, missing: str = "-") -> str:
    """A fingerprint for people: `ssh OpenSSH 9.2p1`, with `missing` for None."""
    if fingerprint is None:
        return missing
    service, product, version, cert = decode_fingerprint(fingerprint)
    words = " ".join(part for part in (service, product, version) if part)
    return f"{words} (cert {cert[:12]})" if cert else words
