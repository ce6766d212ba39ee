"""Port sets: what to scan on a host.

A port set is written as `top100`, `top1000`, `all` (1-65535), a port `N`, a range `N-M`, a
comma-separated string of those (`"22,80,8000-8100"`) or a YAML list mixing them
(`[top100, 8000-8100, 9200]`). Every set resolves to a sorted tuple without duplicates.

Resolving costs time in proportion to what was written, never to what it stands for: each
element becomes intervals of ports (`all` is one interval, not 65,535 ports), an element
written twice is resolved once, and the intervals are merged and expanded once at the end. A
list of half a million `1-65535` (a few MiB of YAML) resolves in about a second, not in an
hour.

Error messages quote the value that is wrong, cut short by `show`: an error about a huge value
(or about a list that YAML aliases made huge) stays one short line and is built in bounded
time.

The top-N lists rank ports by how often they are found open on the internet: the open-frequency
column of nmap's `nmap-services`, which `nmap --top-ports` ranks by. The ranked list ships as
`data/top-ports-tcp.txt`; `python -m exporter.portsets PATH/nmap-services` regenerates it.
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
from collections.abc import Iterator
from pathlib import Path

MIN_PORT = 1
MAX_PORT = 65535
NAMED_SETS = ("top100", "top1000", "all")

_HINT = "use top100, top1000, all, N, N-M or a list"
_DATA_FILE = "top-ports-tcp.txt"
_SHIPPED_TOP = 1000
_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)", re.ASCII)
# How much of a value an error message quotes.
SHOWN_CHARACTERS = 80


class PortSetError(ValueError):
    """A port set that cannot be resolved; the message is meant for the operator."""


def clip(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """`text`, cut to `limit` characters with "..." when it is longer."""
    return text if len(text) <= limit else text[:limit] + "..."


def show(value: object, limit: int = SHOWN_CHARACTERS) -> str:
    """Render a config value the way the operator wrote it in YAML, for error messages.

    At most about `limit` characters: longer strings end in `...'`, and a long list or
    mapping is rendered only as far as the limit (never in full, then cut: a list expanded
    from YAML aliases may hold millions of elements).
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        quoted = repr(value[:limit])
        return quoted[:-1] + "..." + quoted[-1]
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple | dict):
        return _show_collection(value, limit)
    try:
        return clip(str(value), limit)
    except ValueError:  # an integer past Python's conversion limit (4,300 digits)
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def _show_collection(
    value: list[object] | tuple[object, ...] | dict[object, object], limit: int
) -> str:
    items: Iterator[str]
    if isinstance(value, dict):
        items = (f"{show(k, limit)}: {show(v, limit)}" for k, v in value.items())
        opening, closing = "{", "}"
    else:
        items = (show(item, limit) for item in value)
        opening, closing = "[", "]"
    text = opening
    for index, item in enumerate(items):
        text += (", " if index else "") + item
        if len(text) > limit:
            return text[:limit] + "..." + closing
    return text + closing


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
        raise PortSetError(f"port {show(port)} is out of range {MIN_PORT}-{MAX_PORT}")
    return port


Interval = tuple[int, int]  # first and last port, inclusive


def _word(text: str) -> list[Interval]:
    """One comma-free element of a string port set."""
    word = text.strip()
    lowered = word.lower()
    if lowered == "all":
        return [(MIN_PORT, MAX_PORT)]
    if lowered in NAMED_SETS:
        return [(port, port) for port in _named(lowered)]
    if word.isdecimal() and word.isascii():
        port = _port(word)
        return [(port, port)]
    match = _RANGE.fullmatch(word)
    if match:
        low, high = _port(match[1]), _port(match[2])
        if low > high:
            raise PortSetError(f"range {low}-{high} is reversed")
        return [(low, high)]
    raise PortSetError(f"{show(text)} is not a port set ({_HINT})")


def _port(digits: str) -> int:
    """The port written as ASCII `digits`, checked."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(MAX_PORT)):
        # Out of range whatever it is; int() of a long digit string is slow, so not built.
        raise PortSetError(f"port {clip(significant)} is out of range {MIN_PORT}-{MAX_PORT}")
    return _check_port(int(significant))


class PortSetBuilder:
    """Collects the elements of a port set, then gives its ports.

    `add` checks one element (a port, a string, never a list) and raises PortSetError for it
    alone, so that a caller can say which element is wrong. Elements are kept as intervals and
    an element already added is skipped, so adding costs what the element's text costs.
    """

    def __init__(self) -> None:
        self._intervals: list[Interval] = []
        self._seen: set[object] = set()

    def add(self, spec: object) -> None:
        # bool is an int subclass; `ports: true` is a mistake, not port 1.
        if isinstance(spec, bool) or not isinstance(spec, int | str):
            if isinstance(spec, list | tuple):
                raise PortSetError(f"{show(spec)} is a list inside a port list")
            raise PortSetError(f"{show(spec)} is not a port set ({_HINT})")
        key = (type(spec), spec)
        if key in self._seen:
            return
        if isinstance(spec, int):
            self._intervals.append((_check_port(spec), spec))
        elif "," not in spec:
            self._intervals.extend(self._cached_word(spec))
        else:
            for part in spec.split(","):
                if not part.strip():
                    raise PortSetError(f"{show(spec)} has an empty element between commas")
                self._intervals.extend(self._cached_word(part))
        self._seen.add(key)

    def _cached_word(self, text: str) -> list[Interval]:
        key = (str, text.strip().lower())
        if key in self._seen:
            return []
        intervals = _word(text)
        self._seen.add(key)
        return intervals

    def ports(self) -> tuple[int, ...]:
        """The sorted distinct ports of everything added."""
        merged: list[list[int]] = []
        for low, high in sorted(self._intervals):
            if merged and low <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        return tuple(itertools.chain.from_iterable(range(lo, hi + 1) for lo, hi in merged))


def parse_port_set(spec: object) -> tuple[int, ...]:
    """Resolve one port set (a string, an int or a list of those) to sorted distinct ports.

    An empty list is the empty set. Raises PortSetError.
    """
    builder = PortSetBuilder()
    if isinstance(spec, list | tuple):
        for item in spec:
            builder.add(item)
    else:
        builder.add(spec)
    return builder.ports()


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
