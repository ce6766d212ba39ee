"""`--web.config.file`: the exporter-toolkit web configuration (TLS, basic auth, headers).

The file format is the one node_exporter, blackbox_exporter and Prometheus itself read
(https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md), so an
operator can reuse the file they already have. Where Python's `ssl` module cannot do what Go's
`crypto/tls` does, the setting is refused with a message rather than silently weakened:

- `client_auth_type` RequestClientCert / RequireAnyClientCert accept client certificates that
  nobody verified; OpenSSL verifies every certificate it asks for, so they have no equivalent.
  VerifyClientCertIfGiven and RequireAndVerifyClientCert work as in Go.
- `curve_preferences` takes one curve: the `ssl` module can restrict the key exchange to one
  group but cannot set a preference list.
- `http_server_config.http2` is accepted for compatibility; the server speaks HTTP/1.1.

As in exporter-toolkit, relative paths are relative to the directory of the file, the file may
change while the exporter runs (see `WebConfigSource`), and passwords are bcrypt hashes.
Errors name the file, the line and the key: `web.yml:4: tls_server_config.cert_fil: ...`.
"""

from __future__ import annotations

import asyncio
import collections
import difflib
import hashlib
import hmac
import os
import re
import secrets
import ssl
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import yaml
from yaml.constructor import SafeConstructor

from exporter.config import ConfigError, is_null_node, read_config_file, unknown_key_message
from exporter.durations import DurationError, parse_duration

__all__ = [
    "BasicAuthenticator",
    "RateLimit",
    "TLSServerConfig",
    "WebConfig",
    "WebConfigError",
    "WebConfigSource",
    "build_ssl_context",
    "load_web_config",
    "parse_web_config",
]


class WebConfigError(ConfigError):
    """An invalid web configuration. `str()` is one line: `file:line: key.path: message`."""


CLIENT_AUTH_TYPES: Mapping[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")

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

# exporter-toolkit allows these headers only; a tuple lists the only values it accepts.
HEADERS: Mapping[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

TOP_LEVEL_KEYS = (
    "tls_server_config",
    "http_server_config",
    "basic_auth_users",
    "rate_limit",
    "auth_excluded_paths",
)
TLS_KEYS = (
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
)
HTTP_KEYS = ("http2", "headers")
RATE_LIMIT_KEYS = ("interval", "burst")

_BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_HASH_HINT = "generate one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'"


@dataclass(frozen=True)
class TLSServerConfig:
    """`tls_server_config`, with paths made absolute. Exactly one of cert/cert_file (and of
    key/key_file) is set; `lines` maps each key given to its line, for later messages."""

    cert_file: Path | None = None
    key_file: Path | None = None
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    client_ca: str | None = field(default=None, repr=False)
    client_allowed_sans: tuple[str, ...] | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()
    source: str = "<web config>"
    lines: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def files(self) -> tuple[Path, ...]:
        """The files a certificate rotation replaces."""
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    def error(self, key: str | None, message: str) -> WebConfigError:
        name = "tls_server_config" if key is None else f"tls_server_config.{key}"
        return WebConfigError(message, path=self.source, line=self.lines.get(key or ""), key=name)


@dataclass(frozen=True)
class RateLimit:
    interval: float  # seconds between two requests, on average
    burst: int


@dataclass(frozen=True)
class WebConfig:
    path: Path | None = None  # None: built in code, never re-read
    tls_server_config: TLSServerConfig | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    http2: bool = True
    basic_auth_users: Mapping[str, str] = field(default_factory=dict, repr=False)
    rate_limit: RateLimit | None = None
    auth_excluded_paths: tuple[str, ...] = ()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_users)


# --- the YAML walker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reader:
    path: str
    base_dir: Path
    constructor: SafeConstructor = field(default_factory=SafeConstructor)

    def error(self, node: yaml.Node | None, key: str | None, message: str) -> WebConfigError:
        line = None if node is None else node.start_mark.line + 1
        return WebConfigError(message, path=self.path, line=line, key=key)

    def mapping(
        self, node: yaml.Node, key: str, allowed: Collection[str] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """name -> (key node, value node). `allowed` None: any key. A null is empty."""
        if is_null_node(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, key or None, f"expected a mapping, got {self.kind(node)}")
        found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(key_node, key or None, "keys must be plain strings")
            # The key as written: a user named `yes` or `1234` is a user, not a boolean.
            name = key_node.value
            where = f"{key}.{name}" if key else name
            if name in found:
                first = found[name][0].start_mark.line + 1
                raise self.error(key_node, where, f"duplicate key (first given on line {first})")
            if allowed is not None and name not in allowed:
                raise self.error(key_node, where, unknown_key_message(name, allowed))
            found[name] = (key_node, value_node)
        return found

    def plain(self, node: yaml.Node, key: str) -> object:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, key, f"expected a single value, got {self.kind(node)}")
        try:
            return self.constructor.construct_object(node)
        except yaml.constructor.ConstructorError as exc:
            raise self.error(node, key, exc.problem or "cannot read this value") from None

    def kind(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        try:
            value = self.constructor.construct_object(node)
        except yaml.constructor.ConstructorError:
            return f"a value tagged {node.tag!r}"
        if isinstance(value, bool):
            return f"boolean {str(value).lower()}"
        if isinstance(value, str):
            return f"string {value!r}"
        if value is None:
            return "null"
        return f"{type(value).__name__} {value}"

    def string(self, node: yaml.Node, key: str) -> str | None:
        """A string value; null and "" are "not set", as in exporter-toolkit."""
        if is_null_node(node):
            return None
        value = self.plain(node, key)
        if not isinstance(value, str):
            raise self.error(node, key, f"expected a string, got {self.kind(node)}")
        return value or None

    def boolean(self, node: yaml.Node, key: str) -> bool | None:
        if is_null_node(node):
            return None
        value = self.plain(node, key)
        if not isinstance(value, bool):
            raise self.error(node, key, f"expected true or false, got {self.kind(node)}")
        return value

    def strings(self, node: yaml.Node, key: str) -> tuple[tuple[str, yaml.Node], ...] | None:
        if is_null_node(node):
            return None
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, key, f"expected a list of strings, got {self.kind(node)}")
        items = []
        for index, child in enumerate(node.value):
            value = self.plain(child, f"{key}[{index}]")
            if not isinstance(value, str) or not value:
                raise self.error(
                    child, f"{key}[{index}]", f"expected a string, got {self.kind(child)}"
                )
            items.append((value, child))
        return tuple(items)

    def file(self, node: yaml.Node, key: str) -> Path | None:
        text = self.string(node, key)
        if text is None:
            return None
        return Path(os.path.normpath(self.base_dir / os.path.expanduser(text)))


def _choice(
    reader: _Reader, node: yaml.Node, key: str, choices: Collection[str], default: str
) -> str:
    value = reader.string(node, key)
    if value is None:
        return default
    if value not in choices:
        raise reader.error(node, key, f"unknown value {value!r} (valid: {', '.join(choices)})")
    return value


def _tls(reader: _Reader, section: yaml.Node, node: yaml.Node) -> TLSServerConfig | None:
    entries = reader.mapping(node, "tls_server_config", TLS_KEYS)
    lines = {name: k.start_mark.line + 1 for name, (k, _) in entries.items()}
    lines[""] = section.start_mark.line + 1
    values: dict[str, object] = {}

    def key(name: str) -> str:
        return f"tls_server_config.{name}"

    for name, (_, value) in entries.items():
        if name in ("cert_file", "key_file", "client_ca_file"):
            values[name] = reader.file(value, key(name))
        elif name in ("cert", "key", "client_ca"):
            values[name] = reader.string(value, key(name))
    auth_node = entries.get("client_auth_type", (None, None))[1]
    if auth_node is not None:
        auth = reader.string(auth_node, key("client_auth_type"))
        if auth in _UNVERIFIED_CLIENT_AUTH:
            raise reader.error(
                auth_node,
                key("client_auth_type"),
                f"{auth} accepts client certificates nobody verified, which is not supported;"
                " use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with"
                " client_ca_file",
            )
        if auth is not None and auth not in CLIENT_AUTH_TYPES:
            valid = ", ".join(CLIENT_AUTH_TYPES)
            raise reader.error(
                auth_node, key("client_auth_type"), f"unknown value {auth!r} (valid: {valid})"
            )
        values["client_auth_type"] = auth
    for name in ("min_version", "max_version"):
        if name in entries:
            default = "TLS12" if name == "min_version" else "TLS13"
            values[name] = _choice(reader, entries[name][1], key(name), TLS_VERSIONS, default)
    if "prefer_server_cipher_suites" in entries:
        values["prefer_server_cipher_suites"] = reader.boolean(
            entries["prefer_server_cipher_suites"][1], key("prefer_server_cipher_suites")
        )
    for name, table in (("cipher_suites", CIPHER_SUITES), ("curve_preferences", CURVES)):
        if name not in entries:
            continue
        items = reader.strings(entries[name][1], key(name)) or ()
        for index, (item, item_node) in enumerate(items):
            if item not in table:
                close = difflib.get_close_matches(item, list(table), n=1, cutoff=0.8)
                hint = f" (did you mean {close[0]}?)" if close else ""
                what = "cipher suite" if name == "cipher_suites" else "curve"
                raise reader.error(item_node, f"{key(name)}[{index}]", f"unknown {what}{hint}")
        if name == "curve_preferences" and len(items) > 1:
            raise reader.error(
                entries[name][1],
                key(name),
                "only one curve can be given here (Python's ssl module cannot set a"
                " preference list)",
            )
        values[name] = tuple(item for item, _ in items)
    if "client_allowed_sans" in entries:
        sans = reader.strings(entries["client_allowed_sans"][1], key("client_allowed_sans"))
        values["client_allowed_sans"] = None if sans is None else tuple(s for s, _ in sans)

    given = {k: v for k, v in values.items() if v is not None}
    enabled = (
        any(
            name in given
            for name in ("cert", "key", "client_ca", "cert_file", "key_file", "client_ca_file")
        )
        or "client_auth_type" in given
    )
    if not enabled:
        if given:
            raise reader.error(
                section, "tls_server_config", "TLS settings without cert_file and key_file"
            )
        return None
    tls = TLSServerConfig(
        cert_file=_path_or_none(given.get("cert_file")),
        key_file=_path_or_none(given.get("key_file")),
        cert=_str_or_none(given.get("cert")),
        key=_str_or_none(given.get("key")),
        client_auth_type=str(given.get("client_auth_type", "NoClientCert")),
        client_ca_file=_path_or_none(given.get("client_ca_file")),
        client_ca=_str_or_none(given.get("client_ca")),
        client_allowed_sans=_strs_or_none(given.get("client_allowed_sans")),
        min_version=str(given.get("min_version", "TLS12")),
        max_version=str(given.get("max_version", "TLS13")),
        cipher_suites=_strs_or_none(given.get("cipher_suites")) or (),
        prefer_server_cipher_suites=given.get("prefer_server_cipher_suites") is not False,
        curve_preferences=_strs_or_none(given.get("curve_preferences")) or (),
        source=reader.path,
        lines=lines,
    )
    _check_tls(tls)
    return tls


def _path_or_none(value: object) -> Path | None:
    return value if isinstance(value, Path) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _strs_or_none(value: object) -> tuple[str, ...] | None:
    if not isinstance(value, tuple):
        return None
    return tuple(str(item) for item in value)


def _check_tls(tls: TLSServerConfig) -> None:
    for inline, path in (("cert", "cert_file"), ("key", "key_file")):
        given_inline = getattr(tls, inline) is not None
        given_path = getattr(tls, path) is not None
        if given_inline and given_path:
            raise tls.error(inline, f"give {inline} or {path}, not both")
        if not given_inline and not given_path:
            raise tls.error(None, f"missing {path} (or an inline {inline})")
    if tls.client_ca is not None and tls.client_ca_file is not None:
        raise tls.error("client_ca", "give client_ca or client_ca_file, not both")
    has_ca = tls.client_ca is not None or tls.client_ca_file is not None
    if has_ca and tls.client_auth_type == "NoClientCert":
        raise tls.error(
            "client_ca_file" if tls.client_ca_file else "client_ca",
            "client CAs are configured but client_auth_type is NoClientCert"
            " (use RequireAndVerifyClientCert)",
        )
    if not has_ca and tls.client_auth_type != "NoClientCert":
        raise tls.error(
            "client_auth_type",
            f"{tls.client_auth_type} needs client_ca_file (or client_ca) to verify clients with",
        )
    if tls.client_allowed_sans is not None and tls.client_auth_type != "RequireAndVerifyClientCert":
        raise tls.error(
            "client_allowed_sans",
            "client_allowed_sans needs client_auth_type RequireAndVerifyClientCert",
        )
    if TLS_VERSIONS[tls.min_version] > TLS_VERSIONS[tls.max_version]:
        raise tls.error(
            "min_version", f"min_version {tls.min_version} is above max_version {tls.max_version}"
        )


def _http(reader: _Reader, node: yaml.Node) -> tuple[bool, dict[str, str]]:
    entries = reader.mapping(node, "http_server_config", HTTP_KEYS)
    http2 = True
    if "http2" in entries:
        value = reader.boolean(entries["http2"][1], "http_server_config.http2")
        http2 = True if value is None else value
    headers: dict[str, str] = {}
    if "headers" in entries:
        for name, (key_node, value_node) in reader.mapping(
            entries["headers"][1], "http_server_config.headers", None
        ).items():
            where = f"http_server_config.headers.{name}"
            if name not in HEADERS:
                close = difflib.get_close_matches(name, list(HEADERS), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise reader.error(key_node, where, f"this header cannot be configured{hint}")
            text = reader.string(value_node, where)
            if text is None:
                continue  # blank: unset, as in exporter-toolkit
            allowed = HEADERS[name]
            if allowed is not None and text not in allowed:
                raise reader.error(
                    value_node, where, f"{text!r} is not one of: {', '.join(allowed)}"
                )
            headers[name] = text
    return http2, headers


def _users(reader: _Reader, node: yaml.Node) -> dict[str, str]:
    users: dict[str, str] = {}
    for name, (key_node, value_node) in reader.mapping(node, "basic_auth_users", None).items():
        where = f"basic_auth_users.{name}"
        if not name or ":" in name:
            raise reader.error(key_node, where, "user names cannot be empty or contain ':'")
        if not isinstance(value_node, yaml.ScalarNode) or is_null_node(value_node):
            raise reader.error(value_node, where, f"expected a bcrypt hash ({_HASH_HINT})")
        # The raw text: the hash is never echoed back, whatever YAML would make of it.
        match = _BCRYPT_HASH.fullmatch(value_node.value.strip())
        if match is None:
            raise reader.error(value_node, where, f"not a bcrypt hash ({_HASH_HINT})")
        if not 4 <= int(match[1]) <= 31:
            raise reader.error(value_node, where, "bcrypt cost must be within 4-31")
        users[name] = match[0]
    return users


def _rate_limit(reader: _Reader, node: yaml.Node) -> RateLimit | None:
    entries = reader.mapping(node, "rate_limit", RATE_LIMIT_KEYS)
    interval = 0.0
    burst = 0
    if "interval" in entries:
        value_node = entries["interval"][1]
        try:
            interval = parse_duration(reader.plain(value_node, "rate_limit.interval"))
        except DurationError as exc:
            raise reader.error(value_node, "rate_limit.interval", str(exc)) from None
    if "burst" in entries:
        value_node = entries["burst"][1]
        value = reader.plain(value_node, "rate_limit.burst")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise reader.error(
                value_node,
                "rate_limit.burst",
                f"expected an integer >= 0, got {reader.kind(value_node)}",
            )
        burst = value
    if interval == 0:
        return None  # 0 turns the limiter off, as in exporter-toolkit
    if burst < 1:
        where = entries["burst"][1] if "burst" in entries else node
        raise reader.error(where, "rate_limit.burst", "must be at least 1 when an interval is set")
    return RateLimit(interval=interval, burst=burst)


def _excluded_paths(reader: _Reader, node: yaml.Node) -> tuple[str, ...]:
    items = reader.strings(node, "auth_excluded_paths") or ()
    for index, (path, item_node) in enumerate(items):
        if not path.startswith("/"):
            raise reader.error(
                item_node, f"auth_excluded_paths[{index}]", "a path must start with '/'"
            )
    return tuple(path for path, _ in items)


def parse_web_config(text: str, path: str | Path) -> WebConfig:
    """Validate web configuration text as if read from `path`; loads the TLS certificates
    it names to check them. Raises WebConfigError."""
    shown = os.fspath(path)
    reader = _Reader(shown, Path(os.path.abspath(Path(shown).parent)))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        problem = exc.problem or "invalid YAML"
        raise WebConfigError(f"invalid YAML: {problem}", path=shown, line=line) from None
    except yaml.YAMLError as exc:
        raise WebConfigError(f"invalid YAML: {exc}", path=shown) from None
    if root is None or is_null_node(root):
        return WebConfig(path=Path(shown))
    top = reader.mapping(root, "", TOP_LEVEL_KEYS)
    tls = _tls(reader, *top["tls_server_config"]) if "tls_server_config" in top else None
    http2, headers = (
        _http(reader, top["http_server_config"][1]) if "http_server_config" in top else (True, {})
    )
    config = WebConfig(
        path=Path(shown),
        tls_server_config=tls,
        headers=headers,
        http2=http2,
        basic_auth_users=_users(reader, top["basic_auth_users"][1])
        if "basic_auth_users" in top
        else {},
        rate_limit=_rate_limit(reader, top["rate_limit"][1]) if "rate_limit" in top else None,
        auth_excluded_paths=_excluded_paths(reader, top["auth_excluded_paths"][1])
        if "auth_excluded_paths" in top
        else (),
    )
    if tls is not None:
        build_ssl_context(tls)
    return config


def load_web_config(path: str | Path) -> WebConfig:
    """Read and validate a web configuration file. Raises WebConfigError."""
    shown, text = read_config_file(path, WebConfigError)
    return parse_web_config(text, shown)


# --- TLS ---------------------------------------------------------------------------------------


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


# --- live changes ------------------------------------------------------------------------------


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: Kubernetes swaps a symlink to update a secret
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class WebConfigSource:
    """The current web configuration, re-read when its file changes (as exporter-toolkit
    re-reads it on every request), and the TLS context, rebuilt when a certificate changes.

    A file that became invalid makes `current()` raise until it is fixed: requests fail
    closed (500) rather than run with a configuration the operator replaced.
    """

    def __init__(self, config: WebConfig) -> None:
        self._config = config
        self._error: WebConfigError | None = None
        self._stamp = None if config.path is None else _stamp(config.path)
        self._tls_key: tuple[object, ...] | None = None
        self._tls_context: ssl.SSLContext | None = None
        self.changes = 0  # successful re-reads, for logs and tests

    @property
    def path(self) -> Path | None:
        return self._config.path

    def current(self) -> WebConfig:
        path = self._config.path
        if path is not None:
            stamp = _stamp(path)
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._config = load_web_config(path)
                    self._error = None
                    self.changes += 1
                except WebConfigError as exc:
                    self._error = exc
        if self._error is not None:
            raise self._error
        return self._config

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context for a new TLS connection; None when the file no longer sets up TLS."""
        tls = self.current().tls_server_config
        if tls is None:
            return None
        key = (tls, *(_stamp(p) for p in tls.files))
        if key != self._tls_key or self._tls_context is None:
            self._tls_context = build_ssl_context(tls)
            self._tls_key = key
        return self._tls_context


# --- basic auth --------------------------------------------------------------------------------

# A bcrypt hash of a random password nobody knows, checked for unknown users so that the
# answer takes as long as for a known user with a wrong password (no user enumeration).
_DECOY_HASH = b"$2b$10$xq2Ydw9UeInGH2gHdGIk4em8KOWIdJ.A3N8alHxW1C5UkOl.R8iZq"
# bcrypt reads the first 72 bytes of a password (htpasswd hashes longer ones that way).
_BCRYPT_MAX_BYTES = 72


def _bcrypt_matches(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX_BYTES], hashed)
    except ValueError:
        return False


class BasicAuthenticator:
    """Checks credentials against `basic_auth_users`, remembering the pairs that matched.

    bcrypt is slow on purpose (~70 ms at cost 10), and Prometheus sends the same credentials
    on every scrape. The cache key is an HMAC of (user, hash, password) under a key made at
    start, so the cache holds no password, nor anything that can be tested offline for one.
    Only one bcrypt check runs at a time, in a thread: a flood of wrong passwords costs one
    core, never the event loop.
    """

    def __init__(self, *, cache_size: int = 128) -> None:
        self._secret = secrets.token_bytes(32)
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = asyncio.Lock()
        self.bcrypt_checks = 0

    def _key(self, user: bytes, hashed: bytes, password: bytes) -> bytes:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in (user, hashed, password):
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()

    async def verify(self, users: Mapping[str, str], user: str, password: str) -> bool:
        known = users.get(user)
        hashed = _DECOY_HASH if known is None else known.encode()
        secret = password.encode("utf-8", "surrogateescape")
        key = self._key(user.encode("utf-8", "surrogateescape"), hashed, secret)
        if known is not None and key in self._cache:
            self._cache.move_to_end(key)
            return True
        async with self._lock:
            self.bcrypt_checks += 1
            matches = await asyncio.to_thread(_bcrypt_matches, secret, hashed)
        if known is None or not matches:
            return False
        self._cache[key] = None
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True
