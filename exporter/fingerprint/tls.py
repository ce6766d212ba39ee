"""TLS: the handshake used as a probe, and what the peer's certificate says.

We identify, we do not validate: certificate verification is off, every protocol version and
cipher OpenSSL still implements is allowed (old appliances are exactly what an inventory must
see), and the certificate is read from its DER bytes with `cryptography`, because the stdlib
only decodes certificates it has verified.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
from functools import cache

from cryptography import x509

from ..model import UNKNOWN_SERVICE, TLSInfo
from .sanitize import sanitize

# Names in a certificate are chosen by whoever runs the port: they reach terminals, the
# status page and the store, so they are sanitized like banners, with a cap per name.
NAME_LIMIT = 512

# Service names for "X inside TLS" that people already use (IANA / nmap names).
_TLS_SERVICE_NAMES = {
    "http": "https",
    "imap": "imaps",
    "pop3": "pop3s",
    "smtp": "smtps",
    "ftp": "ftps",
    "ldap": "ldaps",
    "nntp": "nntps",
    "irc": "ircs",
    "telnet": "telnets",
    "domain": "domain-s",
}


def tls_service_name(inner: str) -> str:
    """The name of `inner` spoken inside TLS: http -> https, unknown -> tls."""
    if inner in ("", UNKNOWN_SERVICE.service, "tls", "ssl"):
        return "tls"
    if inner in _TLS_SERVICE_NAMES.values():
        return inner
    return _TLS_SERVICE_NAMES.get(inner, f"tls/{inner}")


def wants_tls(service: str) -> bool:
    """Whether a rule's service name says "this port speaks TLS" (nmap's "ssl/http")."""
    return service in ("tls", "ssl") or service.startswith(("ssl/", "tls/"))


def inner_service(service: str) -> str:
    """ "ssl/http" -> "http"; "tls" -> ""."""
    return service.partition("/")[2]


@cache
def client_context() -> ssl.SSLContext:
    """A client context that completes a handshake with anything that speaks TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    # Security level 0 lets OpenSSL talk to servers with small keys or old ciphers; nothing
    # secret is ever sent over these connections.
    context.set_ciphers("ALL:@SECLEVEL=0")
    return context


def sni_name(server_name: str | None) -> str | None:
    """The name to send as SNI: a DNS name, never an IP literal (RFC 6066)."""
    if not server_name:
        return None
    try:
        ipaddress.ip_address(server_name)
    except ValueError:
        return server_name.rstrip(".")
    return None


def _name(value: x509.Name) -> str:
    try:
        return sanitize(value.rfc4514_string(), NAME_LIMIT)
    except ValueError:
        return ""


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return ()
    names: list[str] = []
    for general in extension.value:
        if isinstance(general, x509.IPAddress):
            names.append(str(general.value))
        elif isinstance(general, x509.DNSName | x509.RFC822Name | x509.UniformResourceIdentifier):
            names.append(sanitize(general.value, NAME_LIMIT))
    return tuple(names)


def _not_after(cert: x509.Certificate) -> float:
    try:
        return cert.not_valid_after_utc.timestamp()
    except ValueError:
        return 0.0


def certificate_info(der: bytes, protocol: str) -> TLSInfo:
    """What a DER certificate says. Fields the certificate does not decode are left empty
    (`not_after` 0): the fingerprint still identifies the certificate."""
    sha256 = hashlib.sha256(der).hexdigest()
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return TLSInfo(protocol, subject="", issuer="", sans=(), not_after=0.0, sha256=sha256)
    return TLSInfo(
        protocol=protocol,
        subject=_name(cert.subject),
        issuer=_name(cert.issuer),
        sans=_sans(cert),
        not_after=_not_after(cert),
        sha256=sha256,
    )


def session_info(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> TLSInfo:
    """TLS details of an established session (certificate fields empty if none was sent)."""
    protocol = ssl_object.version() or ""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return TLSInfo(protocol, subject="", issuer="", sans=(), not_after=0.0, sha256="")
    return certificate_info(der, protocol)


def iso_timestamp(seconds: float) -> str:
    """`not_after` as people read it (for the CLI and logs)."""
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).isoformat()
