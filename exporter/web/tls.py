"""TLS for the web server: a `tls_server_config` made into an `ssl.SSLContext`.

The names in the file are Go's (`crypto/tls`, as exporter-toolkit reads them); the tables
below translate them for OpenSSL and are also what the web config parser checks names
against, so a name is accepted exactly when this module can honour it.

A context is built from the certificate files as they are at that moment: `WebConfigSource`
(exporter.web.config_source) calls `build_ssl_context` again when a file changes, so a renewed
certificate is served without a restart. Every problem (a missing file, a key that does not
match, an encrypted key) is a `WebConfigError` naming the key and line that set it.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exporter.web.webconfig import TLSServerConfig

__all__ = ["CIPHER_SUITES", "CLIENT_AUTH_TYPES", "CURVES", "TLS_VERSIONS", "build_ssl_context"]

CLIENT_AUTH_TYPES: Mapping[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# Go's crypto/tls names (tls.CipherSuites()) -> OpenSSL names. TLS 1.3 suites are not
# configurable in Go either: they are accepted and have no effect.
CIPHER_SUITES: Mapping[str, str | None] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}

CURVES: Mapping[str, str] = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}


def _read_pem(tls: TLSServerConfig, key: str, path: Path, marker: str, what: str) -> str:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise tls.error(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if marker not in text:
        raise tls.error(key, f"{path}: no PEM {what} found")
    return text


def _refuse_password(*_: object) -> bytes:
    # Without a callback OpenSSL would prompt for a pass phrase on the terminal.
    raise ValueError("encrypted private keys are not supported")


def _pem(
    tls: TLSServerConfig, inline: str, path_key: str, marker: str, what: str
) -> tuple[str, str]:
    """(PEM text, key it came from) of a cert/key/CA given inline or as a file."""
    text = getattr(tls, inline)
    if text is not None:
        if marker not in text:
            raise tls.error(inline, f"no PEM {what} found")
        return text, inline
    path = getattr(tls, path_key)
    if path is None:
        raise tls.error(None, f"missing {path_key} (or an inline {inline})")
    return _read_pem(tls, path_key, path, marker, what), path_key


def build_ssl_context(tls: TLSServerConfig) -> ssl.SSLContext:
    """A server context for `tls`, reading its files now. Raises WebConfigError."""
    cert, _ = _pem(tls, "cert", "cert_file", "-----BEGIN CERTIFICATE", "certificate")
    key, key_name = _pem(tls, "key", "key_file", "PRIVATE KEY-----", "private key")
    if "ENCRYPTED" in key:
        raise tls.error(key_name, "encrypted private keys are not supported")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.maximum_version = TLS_VERSIONS[tls.max_version]
    # load_cert_chain reads files only: the PEM text goes through a private directory, which
    # also makes the certificate and key one consistent pair even while a rotation rewrites
    # the files.
    with tempfile.TemporaryDirectory(prefix="portscan-tls-") as scratch:
        cert_path, key_path = Path(scratch, "cert.pem"), Path(scratch, "key.pem")
        cert_path.write_text(cert)
        key_path.write_text(key)
        try:
            context.load_cert_chain(cert_path, key_path, password=_refuse_password)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise tls.error(
                    key_name, "the private key does not match the certificate"
                ) from None
            raise tls.error(key_name, f"cannot load the certificate and key: {exc}") from None
        except (OSError, ValueError) as exc:
            raise tls.error(key_name, f"cannot load the certificate and key: {exc}") from None
    suites = [name for s in tls.cipher_suites if (name := CIPHER_SUITES[s]) is not None]
    if suites:
        try:
            context.set_ciphers(":".join(suites))
        except ssl.SSLError as exc:
            raise tls.error("cipher_suites", f"not available here: {exc}") from None
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.curve_preferences:
        try:
            context.set_ecdh_curve(CURVES[tls.curve_preferences[0]])
        except (ValueError, ssl.SSLError) as exc:
            raise tls.error("curve_preferences", f"not available here: {exc}") from None
    context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    if tls.client_ca is not None or tls.client_ca_file is not None:
        ca, ca_name = _pem(
            tls, "client_ca", "client_ca_file", "-----BEGIN CERTIFICATE", "certificate"
        )
        try:
            context.load_verify_locations(cadata=ca)
        except (ssl.SSLError, ValueError) as exc:
            raise tls.error(ca_name, f"cannot load the CA certificates: {exc}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context
