"""Configuration: a YAML file in, validated frozen values out.

The schema is data: each section maps its keys to a `Field` (a parser and a default written
as YAML, exactly as an operator would write it in the file). The shared reader
(`exporter.configfile`) walks PyYAML's composed node tree instead of plain dicts so that every
error can name the file, the line and the key path
(`config.yaml:14: targets[2].ports: 'top10000' is not a port set (...)`). Unknown keys,
duplicate keys and wrong types are errors: a typo must never silently fall back to a default.

Targets are expanded here (CIDR blocks become hosts) and merged with `defaults`, so that the
rest of the program sees one `HostSpec` per scanned host with everything resolved.

Every number has a range (the `Field` tables below; config.example.yaml and the README list
them): wide enough for any real deployment, narrow enough that a typo such as
`retries: 1000000` or `interval: 1ms` is an error rather than a daemon that floods a network
or never sleeps. All targets together expand to at most `scan.max_hosts` hosts (itself at most
`MAX_HOSTS`), so that a few lines of large CIDR blocks cannot exhaust memory or commit the
daemon to rounds it cannot finish; a block is refused before it is expanded.

Paths: `fingerprint.nmap_service_probes` is checked whenever the file is read (it must be a
readable file that looks like nmap's probe database; only its first `_PROBES_SNIFF_BYTES` are
read). `storage.path` is checked only on request (`check_paths=True`: `check-config` and the
daemon's start), because commands that merely read the store may run where it is read-only.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from exporter.configfile import (
    MAX_ALIAS_EXPANSION,
    MAX_DEPTH,
    MAX_FILE_BYTES,
    ConfigError,
    Field,
    Invalid,
    Parser,
    Reader,
    Setting,
    boolean,
    describe,
    duration,
    integer,
    is_null_node,
    number,
    optional,
    read_config_file,
    value,
)
from exporter.durations import UNITS, format_duration, parse_duration
from exporter.portsets import PortSetBuilder, PortSetError, show

__all__ = [
    "MAX_ALIAS_EXPANSION",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_HOSTS",
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
    processes: int  # scanner processes; 0: one per usable CPU
    # Exactly one of the two is set: jitter as a fraction of the interval, or fixed seconds.
    jitter_fraction: float | None
    jitter_seconds: float | None
    max_hosts: int


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
    # Where this exporter looks from ("outside", "dmz"): a `vantage` label on every series, so
    # that exporters looking from different places raise separate alerts. None: no label.
    vantage: str | None = None


# --- value parsers ---------------------------------------------------------------------------


def _vantage(node: yaml.Node, reader: Reader) -> str | None:
    if is_null_node(node):
        return None
    text = reader.plain(node)
    if not isinstance(text, str) or not _VANTAGE.fullmatch(text):
        raise Invalid(
            "expected a short name such as outside or dmz-1 (letters, digits and . _ : -,"
            f" at most 63 characters), got {describe(text)}"
        )
    return text


def _port_set(node: yaml.Node, reader: Reader) -> tuple[int, ...]:
    builder = PortSetBuilder()
    if isinstance(node, yaml.SequenceNode):
        # Element by element, so that an error points at the element's line.
        for index, child in enumerate(node.value):
            try:
                builder.add(reader.plain(child))
            except PortSetError as exc:
                raise Invalid(str(exc), child, f"[{index}]") from None
    else:
        try:
            builder.add(reader.plain(node))
        except PortSetError as exc:
            raise Invalid(str(exc)) from None
    return builder.ports()


# A fixed jitter beyond the longest interval means nothing (the schedule uses at most half an
# interval anyway).
_MAX_JITTER = 365 * UNITS["d"]


def _jitter(value: object) -> tuple[float | None, float | None]:
    """(fraction of the interval, None) for "10%", (None, seconds) for a duration."""
    if isinstance(value, str) and value.strip().endswith("%"):
        digits = value.strip().removesuffix("%").strip()
        if re.fullmatch(r"\d{1,3}(\.\d+)?", digits) and float(digits) <= 100:
            return float(digits) / 100, None
        raise ValueError(f"{show(value)} is not a percentage between 0% and 100%")
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(
            f"{show(value)} is neither a percentage of the interval (e.g. 10%)"
            " nor a duration (e.g. 30s)"
        ) from None
    if seconds > _MAX_JITTER:
        raise ValueError(
            f"must be between 0s and {format_duration(_MAX_JITTER)} (or 0% to 100%),"
            f" got {show(value)}"
        )
    return None, seconds


def _path_text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a file path, got {describe(value)}")
    return value


def _relative_hint(text: str) -> str:
    if os.path.isabs(os.path.expanduser(text)):
        return ""
    return " (relative paths are resolved against the config file's directory)"


# nmap's own file has its first Probe line about 2 KiB in; a file without one in its first
# 64 KiB is something else (a typo'd path, /etc/shadow), whatever its name.
_PROBES_SNIFF_BYTES = 64 * 1024
_PROBE_LINE = re.compile(rb"^Probe (TCP|UDP) \S+ q", re.MULTILINE)


def _probes_file(node: yaml.Node, reader: Reader) -> Path:
    text = value(_path_text)(node, reader)
    path = reader.resolve(text)
    hint = _relative_hint(text)
    if not path.exists():
        raise Invalid(f"{show(text)} does not exist{hint}")
    if not path.is_file():
        raise Invalid(f"{show(text)} is not a file{hint}")
    try:
        with path.open("rb") as source:
            head = source.read(_PROBES_SNIFF_BYTES)
    except OSError as exc:
        raise Invalid(f"{show(text)} cannot be read: {exc.strerror or exc}") from None
    if not _PROBE_LINE.search(head):
        raise Invalid(
            f"{show(text)} is not an nmap-service-probes file (no 'Probe TCP' line in its"
            f" first {_PROBES_SNIFF_BYTES // 1024} KiB){hint}"
        )
    return path


def _storage_path(node: yaml.Node, reader: Reader) -> Path:
    return reader.resolve(value(_path_text)(node, reader))


# --- the schema ------------------------------------------------------------------------------

_DAY = UNITS["d"]
_MIB = 1024 * 1024
# The most hosts one configuration may expand to (four /16 blocks): it costs about 150 MB and
# two seconds to load; past it, a few lines of /12 blocks would take gigabytes.
MAX_HOSTS = 262_144


def _seconds(low: str, high: str) -> Parser:
    return duration(minimum=parse_duration(low), maximum=parse_duration(high))


# Keys of `defaults`; a target may override each of them.
TARGET_FIELDS: Mapping[str, Field] = {
    "ports": Field(_port_set, "top1000", "port set to scan"),
    "exclude": Field(_port_set, "[]", "port set subtracted from ports"),
    "interval": Field(_seconds("1s", "365d"), "12h", "time between scans of a host"),
    "timeout": Field(_seconds("10ms", "5m"), "1s", "ceiling of one connect attempt"),
    "retries": Field(integer(0, 10), "1", "extra attempts for an unanswered port"),
    "concurrency": Field(integer(1, 65535), "256", "concurrent probes for one host"),
    "rate": Field(number(0, 1_000_000), "0", "probes per second for one host, 0 = unlimited"),
    "confirmations": Field(integer(1, 10), "2", "consecutive scans that confirm a change"),
    "confirm_after": Field(_seconds("0s", "30d"), "5m", "delay of a confirming re-scan"),
    "expected_open": Field(
        optional(_port_set), "null", "ports that must be open (the baseline); null = learn"
    ),
}
SCAN_FIELDS: Mapping[str, Field] = {
    "max_concurrent_hosts": Field(integer(1, 4096), "64", "hosts scanned at the same time"),
    "max_probes": Field(integer(1, 1_048_576), "16384", "global cap on probes in flight"),
    "processes": Field(integer(0, 64), "0", "scanner processes; 0 = one per usable CPU"),
    "jitter": Field(value(_jitter), "10%", "spread of scan times: 10% of interval, or 30s"),
    "max_hosts": Field(integer(1, MAX_HOSTS), "65536", "most hosts all targets expand to"),
}
FINGERPRINT_FIELDS: Mapping[str, Field] = {
    "enabled": Field(boolean, "true", "identify the service on open ports"),
    "timeout": Field(_seconds("10ms", "10m"), "5s", "total time per port"),
    "max_bytes": Field(integer(1, 16 * _MIB), "16384", "bytes read from a port at most"),
    "concurrency": Field(integer(1, 4096), "32", "ports fingerprinted at the same time"),
    "nmap_service_probes": Field(
        optional(_probes_file), "null", "path to nmap-service-probes (optional)"
    ),
}
STORAGE_FIELDS: Mapping[str, Field] = {
    "path": Field(_storage_path, "portscan.sqlite", "SQLite database, relative to the config"),
    "retention": Field(_seconds("1h", "3650d"), "400d", "how long the timeline is kept"),
}
SECTIONS: Mapping[str, Mapping[str, Field]] = {
    "defaults": TARGET_FIELDS,
    "scan": SCAN_FIELDS,
    "fingerprint": FINGERPRINT_FIELDS,
    "storage": STORAGE_FIELDS,
}
TOP_LEVEL_KEYS = ("vantage", *SECTIONS, "targets")
# A label value people type and read in alert routing: short, no spaces or quotes.
_VANTAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}")
_HOST_HINT = "a DNS name, an IP address or a CIDR block"


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


def _block_hosts(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    """How many hosts `network.hosts()` yields, without expanding it."""
    size = network.num_addresses
    if network.version == 4:
        return size - 2 if network.prefixlen < 31 else size
    return size - 1 if network.prefixlen < 127 else size


def _hosts(text: object, room: int, max_hosts: int) -> list[tuple[str, _Address | str]]:
    """(label, identity) of every host a target's `host` stands for. A block of more than
    `room` hosts (what scan.max_hosts leaves after the targets before it) is refused before
    it is expanded."""
    if not isinstance(text, str):
        raise ValueError(f"expected {_HOST_HINT}, got {describe(text)}")
    if "/" in text:
        try:
            network = ipaddress.ip_network(text)
        except ValueError:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{show(text)} is not a valid CIDR block") from None
            raise ValueError(f"{text} has host bits set (did you mean {loose}?)") from None
        count = _block_hosts(network)
        if count > room:
            before = max_hosts - room
            hosts = f"{before} host" if before == 1 else f"{before} hosts"
            with_others = f"; with the {hosts} of the targets before it that is" if before else ","
            raise ValueError(
                f"{text}: block has {count} hosts{with_others}"
                f" more than scan.max_hosts ({max_hosts})"
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
    settings: Mapping[str, Setting], key: str, target: yaml.Node, reader: Reader
) -> tuple[int, ...]:
    """The ports to scan on a target, checked against its exclude and expected_open."""
    ports, exclude = settings["ports"], settings["exclude"]
    if not ports.value:
        raise reader.error(
            ports.node or target, ports.key, "the port set is empty (nothing to scan)"
        )
    removed = set(exclude.value)
    scanned = tuple(port for port in ports.value if port not in removed)
    if not scanned:
        raise reader.error(
            exclude.node or target, exclude.key, "excludes every port (nothing left to scan)"
        )
    expected = settings["expected_open"]
    if expected.value is not None:
        missing = set(expected.value).difference(scanned)
        if missing:
            where = (
                "" if expected.key.startswith(key + ".") else f" on {key} ({reader.where(target)})"
            )
            verb = "is" if len(missing) == 1 else "are"
            raise reader.error(
                expected.node or target,
                expected.key,
                f"{_port_list(missing)} {verb} not scanned{where}"
                " (expected ports must be scanned: add them to ports or remove them from exclude)",
            )
    return scanned


def _targets(
    top: yaml.MappingNode,
    node: yaml.Node | None,
    defaults: Mapping[str, Setting],
    max_hosts: int,
    reader: Reader,
) -> tuple[HostSpec, ...]:
    if node is None:
        raise reader.error(
            top, "targets", "missing (a non-empty list of hosts to scan is required)"
        )
    if is_null_node(node) or (isinstance(node, yaml.SequenceNode) and not node.value):
        raise reader.error(node, "targets", "empty (at least one target is required)")
    if not isinstance(node, yaml.SequenceNode):
        raise reader.error(node, "targets", f"expected a list, got {reader.kind(node)}")
    seen: dict[_Address | str, tuple[str, yaml.Node, str]] = {}
    specs: list[HostSpec] = []
    for index, item in enumerate(node.value):
        key = f"targets[{index}]"
        host_node: yaml.Node
        settings: Mapping[str, Setting] = defaults
        if isinstance(item, yaml.ScalarNode) and not is_null_node(item):
            host_node, host_key = item, key  # shorthand: `- 192.0.2.10`
        elif isinstance(item, yaml.MappingNode):
            entries = reader.entries(item, key, (*TARGET_FIELDS, "host"))
            if "host" not in entries:
                raise reader.error(
                    item, f"{key}.host", f"missing (every target needs {_HOST_HINT})"
                )
            host_node, host_key = entries["host"][1], f"{key}.host"
        else:
            raise reader.error(
                item,
                key,
                f"expected a mapping with a 'host' key, got {reader.kind(item)}",
            )
        try:
            written = reader.plain(host_node)
            hosts = _hosts(written, max_hosts - len(specs), max_hosts)
        except Invalid as exc:
            raise reader.error(exc.node or host_node, host_key, exc.message) from None
        except ValueError as exc:
            raise reader.error(host_node, host_key, str(exc)) from None
        if isinstance(item, yaml.MappingNode):
            settings = reader.section(entries, key, TARGET_FIELDS, defaults)
        ports = _target_ports(settings, key, item, reader)
        values = {name: settings[name].value for name in TARGET_FIELDS}
        del values["ports"], values["exclude"]
        source = reader.where(item)
        for label, identity in hosts:
            if identity in seen:
                other_key, other_node, other_written = seen[identity]
                relation = "in" if "/" in other_written else "as"
                within = "" if other_written == label else f" ({relation} {other_written})"
                raise reader.error(
                    host_node,
                    host_key,
                    f"{label} is also listed by {other_key} at {reader.where(other_node)}{within};"
                    " each host may appear only once",
                )
            seen[identity] = (key, host_node, str(written))
            specs.append(HostSpec(host=label, ports=ports, source=source, **values))
        if len(specs) > max_hosts:
            raise reader.error(
                host_node,
                host_key,
                f"the targets up to here expand to {len(specs)} hosts, more than"
                f" scan.max_hosts ({max_hosts})",
            )
    return tuple(specs)


# --- paths checked on request ------------------------------------------------------------------


def storage_path_problem(path: Path) -> str | None:
    """Why the SQLite database cannot be opened or created at `path` (absolute), or None.

    Cheap and without side effects (stat and access(2) only). SQLite writes its journal next
    to the database, so the directory must be writable too; a missing directory must be
    creatable, i.e. its nearest existing ancestor a writable directory.
    """
    if path.exists():
        if path.is_dir():
            return "is a directory (storage.path names the SQLite database file)"
        if not path.is_file():
            return "is not a regular file (storage.path names the SQLite database file)"
        if not os.access(path, os.R_OK | os.W_OK):
            return "is not readable and writable by this user"
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return (
                f"its directory {path.parent} is not writable"
                " (SQLite writes its journal next to the database)"
            )
        return None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be created: {ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: {ancestor} is not writable by this user"
    return None


# --- entry points ----------------------------------------------------------------------------


def parse_config(text: str, path: str | Path, *, check_paths: bool = False) -> Config:
    """Validate configuration text as if read from `path` (which names it in messages and
    anchors relative paths). `check_paths` also checks that the store can be opened or
    created where `storage.path` says. Raises ConfigError, and nothing else, whatever the
    text holds."""
    reader = Reader.for_file(path)
    root = reader.compose(text)
    if root is None or is_null_node(root):
        raise ConfigError(
            "the configuration is empty (it needs at least a 'targets' list)",
            path=reader.path,
            line=1,
        )
    if not isinstance(root, yaml.MappingNode):
        raise reader.error(
            root,
            None,
            f"the top level must be a mapping with a 'targets' key, got {reader.kind(root)}",
        )
    top = reader.entries(root, "", TOP_LEVEL_KEYS)

    def section(name: str) -> dict[str, Setting]:
        fields = SECTIONS[name]
        entries = reader.entries(top[name][1], name, fields) if name in top else {}
        return reader.section(entries, name, fields)

    scan = section("scan")
    fingerprint = section("fingerprint")
    storage = section("storage")
    defaults = section("defaults")
    # `defaults` is checked as a whole (ports vs exclude vs expected_open) only through the
    # targets that inherit it, so that a target can repair a default it overrides.
    targets_node = top["targets"][1] if "targets" in top else None
    hosts = _targets(root, targets_node, defaults, scan["max_hosts"].value, reader)

    if check_paths:
        where = storage["path"]
        problem = storage_path_problem(where.value)
        if problem is not None:
            raise reader.error(where.node, where.key, f"{where.value} {problem}")

    jitter_fraction, jitter_seconds = scan["jitter"].value
    vantage = reader.value(_vantage, top["vantage"][1], "vantage") if "vantage" in top else None
    return Config(
        path=Path(path),
        hosts=hosts,
        scan=ScanSettings(
            max_concurrent_hosts=scan["max_concurrent_hosts"].value,
            max_probes=scan["max_probes"].value,
            processes=scan["processes"].value,
            jitter_fraction=jitter_fraction,
            jitter_seconds=jitter_seconds,
            max_hosts=scan["max_hosts"].value,
        ),
        fingerprint=FingerprintSettings(**{k: s.value for k, s in fingerprint.items()}),
        storage=StorageSettings(**{k: s.value for k, s in storage.items()}),
        vantage=vantage,
    )


def load_config(path: str | Path, *, check_paths: bool = False) -> Config:
    """Read and validate a configuration file (see parse_config). Raises ConfigError."""
    shown, text = read_config_file(path)
    return parse_config(text, shown, check_paths=check_paths)
