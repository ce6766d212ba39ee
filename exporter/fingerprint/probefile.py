"""nmap's probe-file format: the probes to send and the rules that read their answers.

Both the built-in database (`exporter/data/fingerprint-signatures.txt`) and nmap's
`nmap-service-probes` are written in this format (https://nmap.org/book/vscan-fileformat.html);
one parser reads both. The built-in file uses a few documented extensions (see the top of that
file) and Python `re` syntax, which the `regex` package runs as is; nmap's file is read
strictly, its PCRE patterns go through `pcre.compile_pcre`, and the rules that cannot run are
counted instead of failing the load. Only TCP probes are kept.

A `Rule` matches one answer in bounded time (`Rule.match` takes a timeout) and fills its
version fields from the match (`$1`, `$P(1)`, `$SUBST(...)`, `$I(...)`); how rules are ordered
and tried is `signatures.SignatureDB`'s business.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import regex

from .pcre import Match, Pattern, UnsupportedPattern, compile_native, compile_pcre, search
from .sanitize import sanitize

_FIELD_LIMITS = {"product": 80, "version": 64, "extra": 160}

Dialect = Literal["builtin", "nmap"]


class SignatureError(ValueError):
    """A line of a signature file that cannot be used (with its line number)."""

    def __init__(self, line_no: int, message: str, source: str = "signatures") -> None:
        super().__init__(f"{source}:{line_no}: {message}")
        self.line_no = line_no


@dataclass(frozen=True, slots=True)
class PortRanges:
    """A set of TCP ports kept as inclusive ranges ("21-23,80")."""

    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> PortRanges:
        """Parse nmap's port syntax; UDP (`U:`) parts are dropped, `T:` is accepted."""
        ranges: list[tuple[int, int]] = []
        protocol = "T"
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            if len(item) > 2 and item[1] == ":" and item[0] in "TUSPtusp":
                protocol = item[0].upper()
                item = item[2:]
            if protocol != "T":
                continue
            low, sep, high = item.partition("-")
            try:
                first, last = int(low), int(high) if sep else int(low)
            except ValueError:
                raise ValueError(f"bad port range {raw.strip()!r}") from None
            if not 0 <= first <= last <= 65535:
                raise ValueError(f"bad port range {raw.strip()!r}")
            ranges.append((first, last))
        return cls(tuple(ranges))

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(lo <= port <= hi for lo, hi in self.ranges)

    def __or__(self, other: PortRanges) -> PortRanges:
        return PortRanges(self.ranges + other.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)


@dataclass(frozen=True, slots=True)
class Found:
    """What a matching rule says about the service."""

    service: str
    product: str
    version: str
    extra: str
    soft: bool
    rule: Rule = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Rule:
    """One `match`/`softmatch` line."""

    service: str
    pattern: Pattern
    soft: bool
    product: str = ""
    version: str = ""
    info: str = ""
    hostname: str = ""
    os: str = ""
    device: str = ""
    source: str = "builtin"
    line_no: int = 0

    def match(self, data: bytes, timeout: float) -> Found | None:
        """The rule's reading of `data`; `TimeoutError` when the pattern takes longer."""
        found = search(self.pattern, data, timeout)
        if found is None:
            return None
        extra = "; ".join(
            part
            for part in (
                _expand(self.info, found),
                _labelled("host", _expand(self.hostname, found)),
                _labelled("os", _expand(self.os, found)),
                _labelled("device", _expand(self.device, found)),
            )
            if part
        )
        return Found(
            service=self.service,
            product=_clean(_expand(self.product, found), "product"),
            version=_clean(_expand(self.version, found), "version"),
            extra=_clean(extra, "extra"),
            soft=self.soft,
            rule=self,
        )


@dataclass(frozen=True, slots=True)
class Probe:
    """One `Probe` block: the bytes to send and the ports it is meant for."""

    name: str
    payload: bytes = b""
    tls_handshake: bool = False  # built-in extension: "send" a TLS ClientHello
    ports: PortRanges = PortRanges()
    ssl_ports: PortRanges = PortRanges()
    wait: float = 5.0  # seconds to wait for an answer (totalwaitms)
    rarity: int = 1
    fallback: tuple[str, ...] = ()
    templated: bool = False  # payload contains {host}, filled in per target
    source: str = "builtin"
    order: int = 0  # position in the merged database, for stable ordering

    def render(self, authority: str) -> bytes:
        if not self.templated:
            return self.payload
        return self.payload.replace(b"{host}", authority.encode("ascii", errors="replace"))


@dataclass(frozen=True, slots=True)
class ProbeFile:
    """What one probe file holds (TCP only), in file order."""

    probes: tuple[Probe, ...]
    rules: tuple[tuple[str, Rule], ...]  # (probe name, rule)
    excluded: PortRanges
    skipped: int  # rules whose pattern cannot run (nmap's dialect only; ours must all run)


def parse(text: str, dialect: Dialect, source: str) -> ProbeFile:
    """Read a probe file; raises `SignatureError` for a line that cannot be used."""
    return _Parser(text, dialect, source).parse()


# -- templates --------------------------------------------------------------------------

_TEMPLATE = re.compile(
    r"\$(?:(\d)"
    r"|P\((\d)\)"
    r'|SUBST\((\d),"((?:[^"\\]|\\.)*)","((?:[^"\\]|\\.)*)"\)'
    r'|I\((\d),"([<>])"\))'
)


def _group(found: Match, index: int) -> bytes:
    try:
        return found.group(index) or b""
    except IndexError:
        return b""


def _expand(template: str, found: Match) -> str:
    """Fill `$1`, `$P(1)`, `$SUBST(1,"a","b")` and `$I(1,">")` from the match."""
    if "$" not in template:
        return template

    def substitute(token: re.Match[str]) -> str:
        plain, printable, subst, old, new, integer, endian = token.groups()
        if plain is not None:
            return _group(found, int(plain)).decode("latin-1")
        if printable is not None:
            raw = _group(found, int(printable))
            return bytes(b for b in raw if 0x20 <= b < 0x7F).decode("ascii")
        if subst is not None:
            return _group(found, int(subst)).decode("latin-1").replace(old, new)
        raw = _group(found, int(integer))
        return str(int.from_bytes(raw, "big" if endian == ">" else "little")) if raw else ""

    return _TEMPLATE.sub(substitute, template)


def _labelled(label: str, value: str) -> str:
    return f"{label}: {value}" if value else ""


def _clean(value: str, kind: str) -> str:
    return sanitize(" ".join(value.split()), _FIELD_LIMITS[kind])


# -- the parser ------------------------------------------------------------------------

_C_ESCAPES = {"0": 0, "a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}
_FIELD_KEYS = {
    "p": "product",
    "v": "version",
    "i": "info",
    "h": "hostname",
    "o": "os",
    "d": "device",
}
_PROBE_LINE = re.compile(r"Probe\s+(\S+)\s+(\S+)\s+(.*)$")
_MATCH_LINE = re.compile(r"(softmatch|match)\s+(\S+)\s+m(.)")


def decode_payload(text: str) -> bytes:
    """Decode the C-style escapes nmap allows in `q|...|` strings."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\" or i + 1 == len(text):
            out += char.encode("latin-1")
            i += 1
            continue
        esc = text[i + 1]
        if esc == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2 : i + 4]):
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
            continue
        out.append(_C_ESCAPES.get(esc, ord(esc) if ord(esc) < 256 else 63))
        i += 2
    return bytes(out)


def _split_fields(text: str, line_no: int, source: str) -> Iterator[tuple[str, str]]:
    """Yield (key, value) of the version fields after a match's pattern: p/x/ v|y| cpe:/z/a."""
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        if text.startswith("cpe:", i):
            key, i = "cpe", i + 4
        elif text[i] in _FIELD_KEYS and i + 1 < len(text):
            key, i = _FIELD_KEYS[text[i]], i + 1
        else:
            raise SignatureError(line_no, f"unexpected text {text[i : i + 20]!r}", source)
        delimiter = text[i]
        end = text.find(delimiter, i + 1)
        if end < 0:
            raise SignatureError(line_no, f"unterminated {key} field", source)
        yield key, text[i + 1 : end]
        i = end + 1
        if key == "cpe" and i < len(text) and text[i] == "a":
            i += 1


class _Parser:
    def __init__(self, text: str, dialect: Dialect, source: str) -> None:
        self.text = text
        self.dialect = dialect
        self.source = source
        self.probes: list[Probe] = []
        self.rules: list[tuple[str, Rule]] = []
        self.excluded = PortRanges()
        self.skipped = 0
        self.current: Probe | None = None
        self.current_is_tcp = True

    def error(self, line_no: int, message: str) -> SignatureError:
        return SignatureError(line_no, message, self.source)

    def parse(self) -> ProbeFile:
        for line_no, raw in enumerate(self.text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            self.line(line_no, line)
        self.finish_probe()
        return ProbeFile(
            probes=tuple(replace(probe, order=i) for i, probe in enumerate(self.probes)),
            rules=tuple(self.rules),
            excluded=self.excluded,
            skipped=self.skipped,
        )

    def finish_probe(self) -> None:
        if self.current is not None and self.current_is_tcp:
            self.probes.append(self.current)
        self.current = None

    def line(self, line_no: int, line: str) -> None:
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "Exclude":
            try:
                self.excluded = self.excluded | PortRanges.parse(rest)
            except ValueError as exc:
                raise self.error(line_no, str(exc)) from None
            return
        if keyword == "Probe":
            self.finish_probe()
            self.probe_line(line_no, line)
            return
        if self.current is None:
            if self.dialect == "nmap" and not self.current_is_tcp:
                return
            raise self.error(line_no, f"{keyword!r} before the first Probe")
        if not self.current_is_tcp:
            return  # the rest of a UDP probe block
        if keyword in ("match", "softmatch"):
            self.match_line(line_no, line)
        elif keyword in ("ports", "sslports"):
            try:
                ports = PortRanges.parse(rest)
            except ValueError as exc:
                raise self.error(line_no, str(exc)) from None
            attr = "ports" if keyword == "ports" else "ssl_ports"
            self.current = replace(self.current, **{attr: getattr(self.current, attr) | ports})
        elif keyword == "totalwaitms":
            self.current = replace(self.current, wait=self.number(line_no, rest) / 1000)
        elif keyword == "rarity":
            self.current = replace(self.current, rarity=int(self.number(line_no, rest)))
        elif keyword == "fallback":
            names = tuple(n.strip() for n in rest.split(",") if n.strip())
            self.current = replace(self.current, fallback=self.current.fallback + names)
        elif keyword == "tcpwrappedms":
            self.number(line_no, rest)  # accepted; the engine treats a silent close as final
        elif self.dialect == "builtin":
            raise self.error(line_no, f"unknown directive {keyword!r}")

    def number(self, line_no: int, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise self.error(line_no, f"expected a number, got {text!r}") from None
        if value < 0:
            raise self.error(line_no, f"expected a positive number, got {text!r}")
        return value

    def probe_line(self, line_no: int, line: str) -> None:
        parsed = _PROBE_LINE.match(line)
        if parsed is None:
            raise self.error(line_no, "expected: Probe TCP NAME q|PAYLOAD|")
        protocol, name, body = parsed.groups()
        self.current_is_tcp = protocol.upper() == "TCP"
        source = "builtin" if self.dialect == "builtin" else "nmap"
        if self.dialect == "builtin" and body == "tls":
            self.current = Probe(name=name, tls_handshake=True, source=source)
            return
        if not body.startswith("q") or len(body) < 3:
            raise self.error(line_no, "expected a payload q|...|")
        delimiter = body[1]
        end = body.find(delimiter, 2)
        if end < 0:
            raise self.error(line_no, "unterminated payload")
        raw = body[2:end]
        payload = decode_payload(raw)
        templated = self.dialect == "builtin" and b"{host}" in payload
        self.current = Probe(name=name, payload=payload, templated=templated, source=source)

    def match_line(self, line_no: int, line: str) -> None:
        assert self.current is not None
        head = _MATCH_LINE.match(line)
        if head is None:
            raise self.error(line_no, "expected: match SERVICE m|REGEX|FLAGS ...")
        kind, service, delimiter = head.groups()
        end = line.find(delimiter, head.end())
        if end < 0:
            raise self.error(line_no, "unterminated pattern")
        pattern = line[head.end() : end]
        flags_text = re.match(r"[a-z]*", line[end + 1 :])
        options = flags_text.group(0) if flags_text else ""
        fields = dict(_split_fields(line[end + 1 + len(options) :], line_no, self.source))
        unknown = set(options) - {"i", "s"}
        if unknown and self.dialect == "builtin":
            raise self.error(line_no, f"unknown pattern option {min(unknown)!r}")
        compiler = compile_pcre if self.dialect == "nmap" else compile_native
        try:
            compiled = compiler(pattern, ignore_case="i" in options, dot_all="s" in options)
        except (UnsupportedPattern, regex.error) as exc:
            if self.dialect == "nmap":
                self.skipped += 1
                return
            raise self.error(line_no, f"bad pattern: {exc}") from None
        fields.pop("cpe", None)
        self.rules.append(
            (
                self.current.name,
                Rule(
                    service=service,
                    pattern=compiled,
                    soft=kind == "softmatch",
                    source="builtin" if self.dialect == "builtin" else "nmap",
                    line_no=line_no,
                    **fields,
                ),
            )
        )
