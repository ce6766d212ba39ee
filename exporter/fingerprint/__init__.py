"""Service identification: what answers on an open TCP port, and with which version.

For each open port the engine reads a server-first banner, sends a few safe probes chosen by
port and by what it learned (HTTP, TLS, Redis, PostgreSQL, ...), and matches the answers
against a signature database kept as text (`exporter/data/fingerprint-signatures.txt`),
optionally merged with nmap's `nmap-service-probes`. Results are `model.ServiceIdentity`
values whose `fingerprint` only depends on stable parts (service, product, version, TLS
certificate), so a restart or a second look never reads as a change.

    db = load_signatures(options)
    identities = await identify_ports("192.0.2.10", [22, 443], db=db, options=options)
"""

from .connection import Dialer
from .engine import (
    FingerprintOptions,
    Identification,
    identify_port,
    identify_port_detailed,
    identify_ports,
    identify_ports_detailed,
    identify_scanned,
    load_signatures,
)
from .sanitize import sanitize
from .signatures import SignatureDB, SignatureError
from .tls import tls_service_name

__all__ = [
    "Dialer",
    "FingerprintOptions",
    "Identification",
    "SignatureDB",
    "SignatureError",
    "identify_port",
    "identify_port_detailed",
    "identify_ports",
    "identify_ports_detailed",
    "identify_scanned",
    "load_signatures",
    "sanitize",
    "tls_service_name",
]
