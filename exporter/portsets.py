"""Port sets: what to scan on a host.

A port set is written as `top100`, `top1000`, `all` (1-65535), a port `N`, a range `N-M`, a
comma-separated string of those (`"22,80,8000-8100"`) or a YAML list mixing them
(`[top100, 8000-8100, 9200]`). Every set resolves to a sorted tuple without duplicates.

The top-N lists rank ports by how often they are found open on the internet: the open-frequency
column of nmap's `nmap-services`, which `nmap --top-ports` ranks by. The ranked list ships as
`data/top-ports-tcp.txt`; `python -m exporter.portsets PATH/nmap-services` regenerates it.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Iterable
from pathlib import Path

MIN_PORT = 1
MAX_PORT = 65535
NAMED_SETS = ("top100", "top1000", "all")

_HINT = "use top100, top1000, all, N, N-M or a list"
_DATA_FILE = "top-ports-tcp.txt"
_SHIPPED_TOP = 1000
_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)", re.ASCII)


class PortSetError(ValueError):
    """A port set that cannot be resolved; the message is meant for the operator."""


def show(value: object) -> str:
    """Render a config value the way the operator wrote it in YAML, for error messages."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


@functools.cache
def _ranked() -> tuple[int, ...]:
    # A plain path rather than importlib.resources: the package ships as files, and the
    # resources machinery costs a one-shot `scan` more start-up time than the scan of a host.
    text = (Path(__file__).parent / "data" / _DATA_FILE).read_text("ascii")
    ports = tuple(
        int(line) for line in map(str.strip, text.splitlines()) if line and not line.startswith("#")
    )
    if len(ports) != _SHIPPED_TOP or len(set(ports)) != len(ports):
        raise RuntimeError(f"{_DATA_FILE} must list {_SHIPPED_TOP} distinct ports")
    return ports


def top_ports(n: int) -> tuple[int, ...]:
    """The `n` TCP ports most often found open, most frequent first."""
    ranked = _ranked()
    if not 1 <= n <= len(ranked):
        raise ValueError(f"top_ports: n must be between 1 and {len(ranked)}, got {n}")
    return ranked[:n]


@functools.cache
def _named(name: str) -> frozenset[int]:
    if name == "all":
        return frozenset(range(MIN_PORT, MAX_PORT + 1))
    return frozenset(top_ports(int(name.removeprefix("top"))))


def _check_port(port: int) -> int:
    if not MIN_PORT <= port <= MAX_PORT:
        raise PortSetError(f"port {port} is out of range {MIN_PORT}-{MAX_PORT}")
    return port


def _word(text: str) -> Iterable[int]:
    """One comma-free element of a string port set."""
    word = text.strip()
    lowered = word.lower()
    if lowered in NAMED_SETS:
        return _named(lowered)
    if word.isdecimal() and word.isascii():
        return (_check_port(int(word)),)
    match = _RANGE.fullmatch(word)
    if match:
        low, high = _check_port(int(match[1])), _check_port(int(match[2]))
        if low > high:
            raise PortSetError(f"range {low}-{high} is reversed")
        return range(low, high + 1)
    raise PortSetError(f"{show(text)} is not a port set ({_HINT})")


def _element(spec: object) -> Iterable[int]:
    # bool is an int subclass; `ports: true` is a mistake, not port 1.
    if isinstance(spec, int) and not isinstance(spec, bool):
        return (_check_port(spec),)
    if isinstance(spec, str):
        if "," not in spec:
            return _word(spec)
        ports: set[int] = set()
        for part in spec.split(","):
            if not part.strip():
                raise PortSetError(f"{show(spec)} has an empty element between commas")
            ports.update(_word(part))
        return ports
    raise PortSetError(f"{show(spec)} is not a port set ({_HINT})")


def parse_port_set(spec: object) -> tuple[int, ...]:
    """Resolve one port set (a string, an int or a list of those) to sorted distinct ports.

    An empty list is the empty set. Raises PortSetError.
    """
    if isinstance(spec, list | tuple):
        ports: set[int] = set()
        for item in spec:
            if isinstance(item, list | tuple):
                raise PortSetError(f"{show(list(item))} is a list inside a port list")
            ports.update(_element(item))
        return tuple(sorted(ports))
    return tuple(sorted(set(_element(spec))))


def resolve_ports(spec: object, exclude: object = None) -> tuple[int, ...]:
    """The ports of `spec` minus those of `exclude` (None excludes nothing), sorted."""
    ports = parse_port_set(spec)
    if exclude is None:
        return ports
    removed = set(parse_port_set(exclude))
    return tuple(port for port in ports if port not in removed)


def rank_nmap_services(text: str) -> list[int]:
    """TCP ports of an nmap-services file, most frequently open first.

    Ties are broken by port number, which selects the same sets as `nmap --top-ports N`.
    """
    entries: dict[int, float] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 3 or not fields[1].endswith("/tcp"):
            continue
        entries[int(fields[1].removesuffix("/tcp"))] = float(fields[2])
    return sorted(entries, key=lambda port: (-entries[port], port))


def render_data_file(nmap_services: str, count: int = _SHIPPED_TOP) -> str:
    """The content of data/top-ports-tcp.txt derived from an nmap-services file."""
    revision = next(
        (line.lstrip("# ").strip() for line in nmap_services.splitlines() if "$Id" in line),
        "unknown revision",
    )
    header = [
        f"# The {count} TCP ports most often found open, most frequent first (one port a line).",
        "# Derived from the open-frequency column (third field) of nmap-services, the data",
        "# `nmap --top-ports N` ranks by: TCP entries sorted by frequency descending, ties by",
        f"# port number ascending (this selects the same set as nmap for every N up to {count}).",
        f"# Source: nmap-services {revision}",
        "# Regenerate: python -m exporter.portsets /usr/share/nmap/nmap-services"
        " > exporter/data/top-ports-tcp.txt",
    ]
    ports = rank_nmap_services(nmap_services)[:count]
    return "\n".join(header + [str(port) for port in ports]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m exporter.portsets PATH/nmap-services", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8", errors="replace") as source:
        sys.stdout.write(render_data_file(source.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
