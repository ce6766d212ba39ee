"""Service identification: what answers on an open TCP port, and with which version.

For each open port the engine reads a server-first banner, sends a few safe probes chosen by
port and by what it learned (HTTP, TLS, Redis, PostgreSQL, ...), and matches the answers
against a signature database kept as text (`exporter/data/fingerprint-signatures.txt`),
optionally merged with nmap's `nmap-service-probes`. Results are `model.ServiceIdentity`
values whose `fingerprint` only depends on stable parts (service, product, version, TLS
certificate), so a restart or a second look never reads as a change.

    fingerprinter = Fingerprinter.load(options)
    found = await fingerprinter.identify_ports("192.0.2.10", [22, 443])
    services = await fingerprinter.identify_scanned(scan_result)

Modules: `engine` (the `Fingerprinter` callers hold), `session` (the procedure for one port),
`signatures` (the database and its time-bounded matching), `probefile` (nmap's probe-file
format), `pcre` (nmap's PCRE patterns on the `regex` package), `connection`, `starttls`,
`tls` and `sanitize`.
"""

from .connection import Dialer
from .engine import Fingerprinter, FingerprintOptions, Identification
from .probefile import SignatureError
from .sanitize import sanitize
from .signatures import SignatureDB
from .tls import tls_service_name

__all__ = [
    "Dialer",
    "FingerprintOptions",
    "Fingerprinter",
    "Identification",
    "SignatureDB",
    "SignatureError",
    "sanitize",
    "tls_service_name",
]
