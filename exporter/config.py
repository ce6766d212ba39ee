"""Configuration: a YAML file in, validated frozen values out.

The schema is data: each section maps its keys to a `Field` (a parser and a default written
as YAML, exactly as an operator would write it in the file). The loader walks PyYAML's composed
node tree instead of plain dicts so that every error can name the file, the line and the key
path (`config.yaml:14: targets[2].ports: 'top10000' is not a port set (...)`). Unknown keys,
duplicate keys and wrong types are errors: a typo must never silently fall back to a default.

Targets are expanded here (CIDR blocks become hosts) and merged with `defaults`, so that the
rest of the program sees one `HostSpec` per scanned host with everything resolved.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from exporter.durations import parse_duration
from exporter.portsets import PortSetError, parse_port_set, show

__all__ = [
    "Config",
    "ConfigError",
    "FingerprintSettings",
    "HostSpec",
    "ScanSettings",
    "StorageSettings",
    "load_config",
    "parse_config",
    "parse_duration",
]


class ConfigError(Exception):
    """An invalid configuration. `str()` is one line: `file:line: key.path: message`."""

    def __init__(
        self, message: str, *, path: str, line: int | None = None, key: str | None = None
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


@dataclass(frozen=True)
class HostSpec:
    """One scanned host, after CIDR expansion and with the defaults merged in."""

    host: str  # the `host` label: the normalized IP address, or the lower-cased DNS name
    ports: tuple[int, ...]  # sorted, exclude applied
    interval: float
    timeout: float
    retries: int
    concurrency: int
    rate: float  # probes per second, 0 = unlimited
    confirmations: int
    confirm_after: float
    expected_open: tuple[int, ...] | None  # None: learn the baseline from the first scan
    source: str  # "config.yaml:12", where the target was declared


@dataclass(frozen=True)
class ScanSettings:
    max_concurrent_hosts: int
    max_probes: int
    # Exactly one of the two is set: jitter as a fraction of the interval, or fixed seconds.
    jitter_fraction: float | None
    jitter_seconds: float | None
    max_cidr_hosts: int


@dataclass(frozen=True)
class FingerprintSettings:
    enabled: bool
    timeout: float
    max_bytes: int
    concurrency: int
    nmap_service_probes: Path | None  # absolute


@dataclass(frozen=True)
class StorageSettings:
    path: Path  # absolute
    retention: float


@dataclass(frozen=True)
class Config:
    path: Path
    hosts: tuple[HostSpec, ...]
    scan: ScanSettings
    fingerprint: FingerprintSettings
    storage: StorageSettings


# --- walking the node tree -------------------------------------------------------------------

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"


class _Invalid(Exception):
    """A bad value. The walker adds the file, the line and the key path.

    `node` and `suffix` point below the value being parsed (an element of a list).
    """

    def __init__(self, message: str, node: yaml.Node | None = None, suffix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.node = node
        self.suffix = suffix


@dataclass(frozen=True)
class _Context:
    path: str  # as the caller gave it, for messages
    base_dir: Path  # absolute directory of the config file
    constructor: SafeConstructor

    def error(self, node: yaml.Node | None, key: str | None, message: str) -> ConfigError:
        return ConfigError(message, path=self.path, line=_line(node), key=key)

    def where(self, node: yaml.Node | None) -> str:
        line = _line(node)
        return self.path if line is None else f"{self.path}:{line}"


def _line(node: yaml.Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1


def is_null_node(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _plain(node: yaml.Node, ctx: _Context, depth: int = 0) -> object:
    """The Python value of a node, for the value parsers."""
    if depth > 50:
        raise _Invalid("nested too deeply (recursive alias?)", node)
    if isinstance(node, yaml.ScalarNode):
        # YAML 1.1 reads 1:30 as the base-60 integer 90 and 1:2:3:4:5:6:7:8 as an integer too;
        # here such a value is a typo or an IPv6 address, never a number.
        if node.tag in (_INT_TAG, _FLOAT_TAG) and ":" in node.value:
            return node.value
        try:
            return ctx.constructor.construct_object(node)
        except yaml.constructor.ConstructorError as exc:
            raise _Invalid(exc.problem or "cannot read this value", node) from exc
    if node.tag not in (_SEQ_TAG, _MAP_TAG):
        # Tagged collections (!!python/object/apply:...) are never built, only refused.
        raise _Invalid(f"unsupported YAML tag {node.tag!r}", node)
    if isinstance(node, yaml.SequenceNode):
        return [_plain(child, ctx, depth + 1) for child in node.value]
    if isinstance(node, yaml.MappingNode):
        return {
            str(_plain(key, ctx, depth + 1)): _plain(value, ctx, depth + 1)
            for key, value in node.value
        }
    raise _Invalid("unsupported YAML node", node)


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {show(value)}"
    if isinstance(value, str):
        return f"string {show(value)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _kind(node: yaml.Node, ctx: _Context) -> str:
    """What a node holds, for "expected X, got Y" messages."""
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    try:
        return _describe(_plain(node, ctx))
    except _Invalid:
        return f"a value tagged {node.tag!r}"


def _merged_pairs(
    node: yaml.MappingNode, seen: frozenset[int] = frozenset()
) -> list[tuple[yaml.Node, yaml.Node]]:
    """The (key, value) pairs contributed by `<<` merge keys; later pairs win."""
    if id(node) in seen:
        raise _Invalid("<< merges a mapping into itself", node)
    pairs: list[tuple[yaml.Node, yaml.Node]] = []
    for key, value in node.value:
        if key.tag != _MERGE_TAG:
            continue
        sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
        # In a merged sequence, earlier mappings take precedence: add them last.
        for source in reversed(sources):
            if not isinstance(source, yaml.MappingNode):
                raise _Invalid("<< must merge a mapping or a list of mappings", source)
            pairs.extend(_merged_pairs(source, seen | {id(node)}))
            pairs.extend((k, v) for k, v in source.value if k.tag != _MERGE_TAG)
    return pairs


def unknown_key_message(name: str, allowed: Collection[str]) -> str:
    """The error for a key not in `allowed`, with the nearest valid one when there is one."""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key (valid keys: {', '.join(sorted(allowed))})"


def _entries(
    node: yaml.Node, key: str, ctx: _Context, allowed: Collection[str]
) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """The keys of a mapping node: name -> (key node, value node). A null node is empty."""
    if is_null_node(node):
        return {}
    if not isinstance(node, yaml.MappingNode):
        got = _kind(node, ctx)
        raise ctx.error(node, key or None, f"expected a mapping, got {got}")
    try:
        merged = _merged_pairs(node)
    except _Invalid as exc:
        raise ctx.error(exc.node or node, key or None, exc.message) from None
    found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in merged:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR_TAG:
            found[key_node.value] = (key_node, value_node)
    own: set[str] = set()
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR_TAG):
            raise ctx.error(
                key_node,
                key or None,
                f"keys must be strings, got {_kind(key_node, ctx)}",
            )
        name = key_node.value
        path = f"{key}.{name}" if key else name
        if name in own:
            first = _line(found[name][0])
            raise ctx.error(key_node, path, f"duplicate key (first given on line {first})")
        own.add(name)
        found[name] = (key_node, value_node)
    for name, (key_node, _) in found.items():
        if name not in allowed:
            raise ctx.error(
                key_node, f"{key}.{name}" if key else name, unknown_key_message(name, allowed)
            )
    return found


# --- value parsers ---------------------------------------------------------------------------

Parser = Callable[[yaml.Node, _Context], Any]


def _value(check: Callable[[object], Any]) -> Parser:
    """A parser for a plain value: `check` gets the Python value and raises ValueError."""

    def parse(node: yaml.Node, ctx: _Context) -> Any:
        try:
            return check(_plain(node, ctx))
        except ValueError as exc:
            raise _Invalid(str(exc)) from None

    return parse


def _integer(minimum: int) -> Parser:
    def check(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return _value(check)


def _number(minimum: float) -> Parser:
    def check(value: object) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum:g}, got {value:g}")
        return float(value)

    return _value(check)


def _duration(*, positive: bool) -> Parser:
    def check(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be longer than 0s, got {show(value)}")
        return seconds

    return _value(check)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _port_set(node: yaml.Node, ctx: _Context) -> tuple[int, ...]:
    if isinstance(node, yaml.SequenceNode):
        # Check element by element first so that the error points at the element's line.
        for index, child in enumerate(node.value):
            try:
                parse_port_set([_plain(child, ctx)])
            except PortSetError as exc:
                raise _Invalid(str(exc), child, f"[{index}]") from None
    try:
        return parse_port_set(_plain(node, ctx))
    except PortSetError as exc:
        raise _Invalid(str(exc)) from None


def _optional(parser: Parser) -> Parser:
    def parse(node: yaml.Node, ctx: _Context) -> Any:
        return None if is_null_node(node) else parser(node, ctx)

    return parse


def _jitter(value: object) -> tuple[float | None, float | None]:
    """(fraction of the interval, None) for "10%", (None, seconds) for a duration."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip().removesuffix("%").strip()
        if re.fullmatch(r"\d+(\.\d+)?", number) and float(number) <= 100:
            return float(number) / 100, None
        raise ValueError(f"{show(value)} is not a percentage between 0% and 100%")
    try:
        return None, parse_duration(value)
    except ValueError:
        raise ValueError(
            f"{show(value)} is neither a percentage of the interval (e.g. 10%)"
            " nor a duration (e.g. 30s)"
        ) from None


def _path_text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a file path, got {_describe(value)}")
    return value


def _resolve(text: str, ctx: _Context) -> Path:
    return Path(os.path.abspath(ctx.base_dir / os.path.expanduser(text)))


def _file_path(node: yaml.Node, ctx: _Context) -> Path:
    text = _value(_path_text)(node, ctx)
    path = _resolve(text, ctx)
    hint = ""
    if not os.path.isabs(os.path.expanduser(text)):
        hint = " (relative paths are resolved against the config file's directory)"
    if not path.exists():
        raise _Invalid(f"{show(text)} does not exist{hint}")
    if not path.is_file():
        raise _Invalid(f"{show(text)} is not a file{hint}")
    return path


def _storage_path(node: yaml.Node, ctx: _Context) -> Path:
    return _resolve(_value(_path_text)(node, ctx), ctx)


# --- the schema ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    parse: Parser
    default: str  # YAML text, parsed like a value from the file
    help: str


# Keys of `defaults`; a target may override each of them.
TARGET_FIELDS: Mapping[str, Field] = {
    "ports": Field(_port_set, "top1000", "port set to scan"),
    "exclude": Field(_port_set, "[]", "port set subtracted from ports"),
    "interval": Field(_duration(positive=True), "12h", "time between scans of a host"),
    "timeout": Field(_duration(positive=True), "1s", "ceiling of one connect attempt"),
    "retries": Field(_integer(0), "1", "extra attempts for an unanswered port"),
    "concurrency": Field(_integer(1), "256", "concurrent probes for one host"),
    "rate": Field(_number(0), "0", "probes per second for one host, 0 = unlimited"),
    "confirmations": Field(_integer(1), "2", "consecutive scans that confirm a change"),
    "confirm_after": Field(_duration(positive=False), "5m", "delay of a confirming re-scan"),
    "expected_open": Field(
        _optional(_port_set), "null", "ports that must be open (the baseline); null = learn"
    ),
}
SCAN_FIELDS: Mapping[str, Field] = {
    "max_concurrent_hosts": Field(_integer(1), "4", "hosts scanned at the same time"),
    "max_probes": Field(_integer(1), "4096", "global cap on probes in flight"),
    "jitter": Field(_value(_jitter), "10%", "spread of scan times: 10% of interval, or 30s"),
    "max_cidr_hosts": Field(_integer(1), "65536", "largest CIDR block accepted"),
}
FINGERPRINT_FIELDS: Mapping[str, Field] = {
    "enabled": Field(_value(_boolean), "true", "identify the service on open ports"),
    "timeout": Field(_duration(positive=True), "5s", "total time per port"),
    "max_bytes": Field(_integer(1), "16384", "bytes read from a port at most"),
    "concurrency": Field(_integer(1), "32", "ports fingerprinted at the same time"),
    "nmap_service_probes": Field(
        _optional(_file_path), "null", "path to nmap-service-probes (optional)"
    ),
}
STORAGE_FIELDS: Mapping[str, Field] = {
    "path": Field(_storage_path, "portscan.sqlite", "SQLite database, relative to the config"),
    "retention": Field(_duration(positive=True), "400d", "how long the timeline is kept"),
}
SECTIONS: Mapping[str, Mapping[str, Field]] = {
    "defaults": TARGET_FIELDS,
    "scan": SCAN_FIELDS,
    "fingerprint": FINGERPRINT_FIELDS,
    "storage": STORAGE_FIELDS,
}
TOP_LEVEL_KEYS = (*SECTIONS, "targets")
_HOST_HINT = "a DNS name, an IP address or a CIDR block"


@functools.cache
def _default_node(text: str) -> yaml.Node:
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    assert node is not None, text
    return node


@dataclass(frozen=True)
class _Setting:
    value: Any
    node: yaml.Node | None  # None: the built-in default
    key: str  # key path where it was set


def _section(
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
    key: str,
    fields: Mapping[str, Field],
    ctx: _Context,
    inherited: Mapping[str, _Setting] | None = None,
) -> dict[str, _Setting]:
    """Parse the entries of a mapping against `fields`; unset keys come from `inherited`."""
    settings: dict[str, _Setting] = {}
    for name, field in fields.items():
        path = f"{key}.{name}"
        if name in entries:
            value_node = entries[name][1]
            try:
                settings[name] = _Setting(field.parse(value_node, ctx), value_node, path)
            except _Invalid as exc:
                raise ctx.error(exc.node or value_node, path + exc.suffix, exc.message) from None
        elif inherited is not None:
            settings[name] = inherited[name]
        else:
            settings[name] = _Setting(field.parse(_default_node(field.default), ctx), None, path)
    return settings


# --- targets ---------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _dns_name(text: str) -> str | None:
    """The normalized form of an RFC 1123 host name, or None."""
    name = text.removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return None
    # An all-numeric last label is a mistyped IPv4 address (999.1.1.1), never a name.
    if labels[-1].isdigit():
        return None
    return name.lower()


def _hosts(text: object, max_cidr_hosts: int) -> list[tuple[str, _Address | str]]:
    """(label, identity) of every host a target's `host` stands for."""
    if not isinstance(text, str):
        raise ValueError(f"expected {_HOST_HINT}, got {_describe(text)}")
    if "/" in text:
        try:
            network = ipaddress.ip_network(text)
        except ValueError:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{show(text)} is not a valid CIDR block") from None
            raise ValueError(f"{text} has host bits set (did you mean {loose}?)") from None
        if network.num_addresses > max_cidr_hosts:
            raise ValueError(
                f"{text}: block has {network.num_addresses} hosts,"
                f" more than scan.max_cidr_hosts ({max_cidr_hosts})"
            )
        # hosts() leaves out the IPv4 network and broadcast addresses (except in /31 and /32)
        # and the IPv6 subnet-router anycast address (except in /127 and /128).
        return [(str(address), address) for address in network.hosts()]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return [(str(address), address)]
    if ":" in text or all(part.isdigit() for part in text.removesuffix(".").split(".")):
        raise ValueError(f"{show(text)} is not a valid IP address")
    name = _dns_name(text)
    if name is None:
        raise ValueError(f"{show(text)} is not {_HOST_HINT}")
    return [(name, name)]


def _port_list(ports: Collection[int]) -> str:
    shown = sorted(ports)
    text = ", ".join(map(str, shown[:10]))
    if len(shown) > 10:
        text += f" and {len(shown) - 10} more"
    return f"port {text}" if len(shown) == 1 else f"ports {text}"


def _target_ports(
    settings: Mapping[str, _Setting], key: str, target: yaml.Node, ctx: _Context
) -> tuple[int, ...]:
    """The ports to scan on a target, checked against its exclude and expected_open."""
    ports, exclude = settings["ports"], settings["exclude"]
    if not ports.value:
        raise ctx.error(ports.node or target, ports.key, "the port set is empty (nothing to scan)")
    removed = set(exclude.value)
    scanned = tuple(port for port in ports.value if port not in removed)
    if not scanned:
        raise ctx.error(
            exclude.node or target, exclude.key, "excludes every port (nothing left to scan)"
        )
    expected = settings["expected_open"]
    if expected.value is not None:
        missing = set(expected.value).difference(scanned)
        if missing:
            where = "" if expected.key.startswith(key + ".") else f" on {key} ({ctx.where(target)})"
            verb = "is" if len(missing) == 1 else "are"
            raise ctx.error(
                expected.node or target,
                expected.key,
                f"{_port_list(missing)} {verb} not scanned{where}"
                " (expected ports must be scanned: add them to ports or remove them from exclude)",
            )
    return scanned


def _targets(
    top: yaml.MappingNode,
    node: yaml.Node | None,
    defaults: Mapping[str, _Setting],
    max_cidr_hosts: int,
    ctx: _Context,
) -> tuple[HostSpec, ...]:
    if node is None:
        raise ctx.error(top, "targets", "missing (a non-empty list of hosts to scan is required)")
    if is_null_node(node) or (isinstance(node, yaml.SequenceNode) and not node.value):
        raise ctx.error(node, "targets", "empty (at least one target is required)")
    if not isinstance(node, yaml.SequenceNode):
        raise ctx.error(node, "targets", f"expected a list, got {_kind(node, ctx)}")
    seen: dict[_Address | str, tuple[str, yaml.Node, str]] = {}
    specs: list[HostSpec] = []
    for index, item in enumerate(node.value):
        key = f"targets[{index}]"
        host_node: yaml.Node
        settings: Mapping[str, _Setting] = defaults
        if isinstance(item, yaml.ScalarNode) and not is_null_node(item):
            host_node, host_key = item, key  # shorthand: `- 192.0.2.10`
        elif isinstance(item, yaml.MappingNode):
            entries = _entries(item, key, ctx, (*TARGET_FIELDS, "host"))
            if "host" not in entries:
                raise ctx.error(item, f"{key}.host", f"missing (every target needs {_HOST_HINT})")
            host_node, host_key = entries["host"][1], f"{key}.host"
        else:
            raise ctx.error(
                item,
                key,
                f"expected a mapping with a 'host' key, got {_kind(item, ctx)}",
            )
        try:
            written = _plain(host_node, ctx)
            hosts = _hosts(written, max_cidr_hosts)
        except _Invalid as exc:
            raise ctx.error(exc.node or host_node, host_key, exc.message) from None
        except ValueError as exc:
            raise ctx.error(host_node, host_key, str(exc)) from None
        if isinstance(item, yaml.MappingNode):
            settings = _section(entries, key, TARGET_FIELDS, ctx, defaults)
        ports = _target_ports(settings, key, item, ctx)
        values = {name: settings[name].value for name in TARGET_FIELDS}
        del values["ports"], values["exclude"]
        source = ctx.where(item)
        for label, identity in hosts:
            if identity in seen:
                other_key, other_node, other_written = seen[identity]
                relation = "in" if "/" in other_written else "as"
                within = "" if other_written == label else f" ({relation} {other_written})"
                raise ctx.error(
                    host_node,
                    host_key,
                    f"{label} is also listed by {other_key} at {ctx.where(other_node)}{within};"
                    " each host may appear only once",
                )
            seen[identity] = (key, host_node, str(written))
            specs.append(HostSpec(host=label, ports=ports, source=source, **values))
    return tuple(specs)


# --- entry points ----------------------------------------------------------------------------


def _syntax_error(exc: yaml.YAMLError, text: str, path: str) -> ConfigError:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        message = exc.problem or "invalid YAML"
        if exc.context:
            context_line = exc.context_mark.line + 1 if exc.context_mark else None
            message += f" ({exc.context}" + (f", line {context_line})" if context_line else ")")
        return ConfigError(f"invalid YAML: {message}", path=path, line=exc.problem_mark.line + 1)
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return ConfigError(
            f"invalid YAML: unacceptable character #x{exc.character:04x}: {exc.reason}",
            path=path,
            line=line,
        )
    return ConfigError(f"invalid YAML: {exc}", path=path)


def parse_config(text: str, path: str | Path) -> Config:
    """Validate configuration text as if read from `path` (which names it in messages and
    anchors relative paths). Raises ConfigError."""
    shown = os.fspath(path)
    ctx = _Context(
        path=shown,
        base_dir=Path(os.path.abspath(Path(shown).parent)),
        constructor=SafeConstructor(),
    )
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, text, shown) from None
    if root is None or is_null_node(root):
        raise ConfigError(
            "the configuration is empty (it needs at least a 'targets' list)", path=shown, line=1
        )
    if not isinstance(root, yaml.MappingNode):
        raise ctx.error(
            root,
            None,
            f"the top level must be a mapping with a 'targets' key, got {_kind(root, ctx)}",
        )
    top = _entries(root, "", ctx, TOP_LEVEL_KEYS)

    def section(name: str) -> dict[str, _Setting]:
        fields = SECTIONS[name]
        entries = _entries(top[name][1], name, ctx, fields) if name in top else {}
        return _section(entries, name, fields, ctx)

    scan = section("scan")
    fingerprint = section("fingerprint")
    storage = section("storage")
    defaults = section("defaults")
    # `defaults` is checked as a whole (ports vs exclude vs expected_open) only through the
    # targets that inherit it, so that a target can repair a default it overrides.
    targets_node = top["targets"][1] if "targets" in top else None
    hosts = _targets(root, targets_node, defaults, scan["max_cidr_hosts"].value, ctx)

    jitter_fraction, jitter_seconds = scan["jitter"].value
    return Config(
        path=Path(path),
        hosts=hosts,
        scan=ScanSettings(
            max_concurrent_hosts=scan["max_concurrent_hosts"].value,
            max_probes=scan["max_probes"].value,
            jitter_fraction=jitter_fraction,
            jitter_seconds=jitter_seconds,
            max_cidr_hosts=scan["max_cidr_hosts"].value,
        ),
        fingerprint=FingerprintSettings(**{k: s.value for k, s in fingerprint.items()}),
        storage=StorageSettings(**{k: s.value for k, s in storage.items()}),
    )


def read_config_file(path: str | Path, error: type[ConfigError] = ConfigError) -> tuple[str, str]:
    """(path as shown in messages, text) of a YAML file; `error` says why it cannot be read."""
    shown = os.fspath(path)
    try:
        with open(shown, encoding="utf-8-sig") as source:
            return shown, source.read()
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", path=shown) from None
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise error("not valid UTF-8", path=shown, line=line) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a configuration file. Raises ConfigError."""
    shown, text = read_config_file(path)
    return parse_config(text, shown)


def describe_defaults() -> str:
    """The built-in defaults as YAML, for `--help`-style output and documentation."""
    lines = []
    for section, fields in SECTIONS.items():
        lines.append(f"{section}:")
        for name, field in fields.items():
            lines.append(f"  {name}: {field.default}  # {field.help}")
    return "\n".join(lines) + "\n"
