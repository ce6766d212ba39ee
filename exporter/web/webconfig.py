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
change while the exporter runs (see exporter.web.config_source), passwords are bcrypt hashes
(exporter.web.basic_auth), and a key set to null, or a string set to "", is not set: its
default applies (except in `rate_limit`, whose two numbers cannot be null).

The file is read by the same reader as the main configuration (exporter.configfile), so it
accepts the same YAML (merge keys included) and its sections are `Field` tables like the main
config's. Errors name the file, the line and the key: `web.yml:4: tls_server_config.cert_fil:
...`. A certificate is loaded while the file is read, so a broken one is an error of the file.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter.configfile import (
    UNSET,
    ConfigError,
    Field,
    Invalid,
    Parser,
    Reader,
    Setting,
    boolean,
    describe,
    duration,
    is_null_node,
    mapping,
    nested,
    optional,
    read_config_file,
    string,
    string_list,
    value,
)
from exporter.web.tls import (
    CIPHER_SUITES,
    CLIENT_AUTH_TYPES,
    CURVES,
    TLS_VERSIONS,
    build_ssl_context,
)

__all__ = [
    "RateLimit",
    "TLSServerConfig",
    "WebConfig",
    "WebConfigError",
    "load_web_config",
    "parse_web_config",
]


class WebConfigError(ConfigError):
    """An invalid web configuration. `str()` is one line: `file:line: key.path: message`."""


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


# --- values ------------------------------------------------------------------------------------

_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
# exporter-toolkit allows these headers only; a tuple lists the only values it accepts.
HEADERS: Mapping[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

_BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_HASH_HINT = "generate one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'"


def _field(parse: Parser, default: str, help: str) -> Field:
    """A field read as exporter-toolkit reads it: a null, or a parser's None (a blank string),
    leaves the default in place."""

    def parse_given(node: yaml.Node, reader: Reader) -> Any:
        parsed = None if is_null_node(node) else parse(node, reader)
        return UNSET if parsed is None else parsed

    return Field(parse_given, default, help)


def _text(node: yaml.Node, reader: Reader) -> str | None:
    """A string; "" is not set (Go's zero string)."""
    text: str = string(node, reader)
    return text or None


def _file(node: yaml.Node, reader: Reader) -> Path | None:
    text = _text(node, reader)
    return None if text is None else reader.resolve(text)


def _choice(choices: Collection[str]) -> Callable[[yaml.Node, Reader], str | None]:
    def parse(node: yaml.Node, reader: Reader) -> str | None:
        text = _text(node, reader)
        if text is not None and text not in choices:
            raise Invalid(f"unknown value {text!r} (valid: {', '.join(choices)})")
        return text

    return parse


def _client_auth(node: yaml.Node, reader: Reader) -> str | None:
    text = _text(node, reader)
    if text in _UNVERIFIED_CLIENT_AUTH:
        raise Invalid(
            f"{text} accepts client certificates nobody verified, which is not supported;"
            " use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file"
        )
    return _choice(CLIENT_AUTH_TYPES)(node, reader)


def _names(table: Collection[str], what: str) -> Parser:
    """A list of names from `table` (Go's spelling), with the nearest one as a hint."""

    def check(name: str) -> None:
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.8)
            raise ValueError(f"unknown {what}" + (f" (did you mean {close[0]}?)" if close else ""))

    return string_list(check)


def _curves(node: yaml.Node, reader: Reader) -> tuple[str, ...]:
    curves: tuple[str, ...] = _names(CURVES, "curve")(node, reader)
    if len(curves) > 1:
        raise Invalid(
            "only one curve can be given here (Python's ssl module cannot set a preference list)"
        )
    return curves


def _headers(node: yaml.Node, reader: Reader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, (key_node, value_node) in mapping(node, reader, None, keys_as_written=True).items():
        if name not in HEADERS:
            close = difflib.get_close_matches(name, list(HEADERS), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise Invalid(f"this header cannot be configured{hint}", key_node, f".{name}")
        text = nested(optional(_text), value_node, reader, f".{name}")
        if text is None:
            continue  # blank: unset, as in exporter-toolkit
        allowed = HEADERS[name]
        if allowed is not None and text not in allowed:
            raise Invalid(f"{text!r} is not one of: {', '.join(allowed)}", value_node, f".{name}")
        headers[name] = text
    return headers


def _bcrypt_hash(node: yaml.Node, reader: Reader) -> str:
    if not isinstance(node, yaml.ScalarNode) or is_null_node(node):
        raise Invalid(f"expected a bcrypt hash ({_HASH_HINT})")
    # The raw text: the hash is never echoed back, whatever YAML would make of it.
    match = _BCRYPT_HASH.fullmatch(node.value.strip())
    if match is None:
        raise Invalid(f"not a bcrypt hash ({_HASH_HINT})")
    if not 4 <= int(match[1]) <= 31:
        raise Invalid("bcrypt cost must be within 4-31")
    return match[0]


def _users(node: yaml.Node, reader: Reader) -> dict[str, str]:
    users: dict[str, str] = {}
    for name, (key_node, value_node) in mapping(node, reader, None, keys_as_written=True).items():
        if not name or ":" in name:
            raise Invalid("user names cannot be empty or contain ':'", key_node, f".{name}")
        users[name] = nested(_bcrypt_hash, value_node, reader, f".{name}")
    return users


def _burst(count: object) -> int:
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"expected an integer >= 0, got {describe(count)}")
    return count


def _absolute_url_path(path: str) -> None:
    if not path.startswith("/"):
        raise ValueError("a path must start with '/'")


# --- the schema ------------------------------------------------------------------------------

TLS_FIELDS: Mapping[str, Field] = {
    "cert": _field(_text, "null", "inline PEM certificate, instead of cert_file"),
    "key": _field(_text, "null", "inline PEM private key, instead of key_file"),
    "client_ca": _field(_text, "null", "inline PEM client CAs, instead of client_ca_file"),
    "cert_file": _field(_file, "null", "server certificate, relative to this file"),
    "key_file": _field(_file, "null", "its private key, relative to this file"),
    "client_auth_type": _field(_client_auth, "NoClientCert", "whether clients need a certificate"),
    "client_ca_file": _field(_file, "null", "CAs that client certificates are verified against"),
    "client_allowed_sans": _field(string_list(), "null", "SANs a client certificate may have"),
    "min_version": _field(_choice(TLS_VERSIONS), "TLS12", "oldest TLS version accepted"),
    "max_version": _field(_choice(TLS_VERSIONS), "TLS13", "newest TLS version accepted"),
    "cipher_suites": _field(_names(CIPHER_SUITES, "cipher suite"), "[]", "TLS 1.2 suites"),
    "prefer_server_cipher_suites": _field(boolean, "true", "the server's order wins"),
    "curve_preferences": _field(_curves, "[]", "the one key exchange group allowed"),
}
# Keys that turn TLS on; the others only tune it.
_TLS_ENABLING = frozenset(
    ("cert", "key", "client_ca", "cert_file", "key_file", "client_ca_file", "client_auth_type")
)
HTTP_FIELDS: Mapping[str, Field] = {
    "http2": _field(boolean, "true", "accepted for compatibility; the server speaks HTTP/1.1"),
    "headers": _field(_headers, "{}", "response headers, among those exporter-toolkit allows"),
}
RATE_LIMIT_FIELDS: Mapping[str, Field] = {
    "interval": Field(duration(positive=False), "0", "mean time between requests; 0 = no limit"),
    "burst": Field(value(_burst), "0", "requests let through at once"),
}
AUTH_FIELDS: Mapping[str, Field] = {
    "basic_auth_users": _field(_users, "{}", "user name: bcrypt hash; none: no basic auth"),
    "auth_excluded_paths": _field(
        string_list(_absolute_url_path), "[]", "paths answered without basic auth"
    ),
}
TOP_LEVEL_KEYS = ("tls_server_config", "http_server_config", *AUTH_FIELDS, "rate_limit")


def _tls(reader: Reader, key_node: yaml.Node, node: yaml.Node) -> TLSServerConfig | None:
    entries = reader.entries(node, "tls_server_config", TLS_FIELDS)
    settings = reader.section(entries, "tls_server_config", TLS_FIELDS)
    given = {name for name, setting in settings.items() if setting.node is not None}
    if not given & _TLS_ENABLING:
        if given:
            raise reader.error(
                key_node, "tls_server_config", "TLS settings without cert_file and key_file"
            )
        return None
    lines = {name: k.start_mark.line + 1 for name, (k, _) in entries.items()}
    lines[""] = key_node.start_mark.line + 1
    tls = TLSServerConfig(
        **{name: setting.value for name, setting in settings.items()},
        source=reader.path,
        lines=lines,
    )
    _check_tls(tls)
    return tls


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


def _rate_limit(reader: Reader, node: yaml.Node) -> RateLimit | None:
    entries = reader.entries(node, "rate_limit", RATE_LIMIT_FIELDS)
    settings = reader.section(entries, "rate_limit", RATE_LIMIT_FIELDS)
    interval, burst = settings["interval"], settings["burst"]
    if interval.value == 0:
        return None  # 0 turns the limiter off, as in exporter-toolkit
    if burst.value < 1:
        raise reader.error(
            burst.node or node, burst.key, "must be at least 1 when an interval is set"
        )
    return RateLimit(interval=interval.value, burst=burst.value)


def parse_web_config(text: str, path: str | Path) -> WebConfig:
    """Validate web configuration text as if read from `path`; loads the TLS certificates
    it names to check them. Raises WebConfigError."""
    reader = Reader.for_file(path, WebConfigError)
    # A syntax error names the problem only, as this file's errors always have.
    root = reader.compose(text, with_context=False)
    if root is None or is_null_node(root):
        return WebConfig(path=Path(reader.path))
    top = reader.entries(root, "", TOP_LEVEL_KEYS)

    def section(name: str, fields: Mapping[str, Field]) -> dict[str, Setting]:
        entries = reader.entries(top[name][1], name, fields) if name in top else {}
        return reader.section(entries, name, fields)

    tls = _tls(reader, *top["tls_server_config"]) if "tls_server_config" in top else None
    http = section("http_server_config", HTTP_FIELDS)
    auth = reader.section(top, "", AUTH_FIELDS)
    config = WebConfig(
        path=Path(reader.path),
        tls_server_config=tls,
        headers=http["headers"].value,
        http2=http["http2"].value,
        basic_auth_users=auth["basic_auth_users"].value,
        rate_limit=_rate_limit(reader, top["rate_limit"][1]) if "rate_limit" in top else None,
        auth_excluded_paths=auth["auth_excluded_paths"].value,
    )
    if tls is not None:
        build_ssl_context(tls)
    return config


def load_web_config(path: str | Path) -> WebConfig:
    """Read and validate a web configuration file. Raises WebConfigError."""
    shown, text = read_config_file(path, WebConfigError)
    return parse_web_config(text, shown)
