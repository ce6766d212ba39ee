"""The signature database: which probes to send, and what their answers mean.

Both the built-in database (`exporter/data/fingerprint-signatures.txt`) and nmap's
`nmap-service-probes` are written in nmap's probe-file syntax
(https://nmap.org/book/vscan-fileformat.html); one parser reads both. The built-in file uses a
few documented extensions (see the top of that file); nmap's file is read strictly, its PCRE
patterns are rewritten for Python (`pcre.py`) and the rules that cannot be are counted in
`SignatureDB.skipped_nmap_rules`.

Matching follows nmap: the answer to a probe is tried against that probe's rules, then against
the rules of its `fallback` probes, then against the NULL probe's rules (what a server says
unprompted can arrive after any request). The first hard `match` wins; a `softmatch` only names
the service, and a later hard match for the same service replaces it. In a merged database our
rules that name a product come first (they are written for stable identities), then nmap's,
then our catch-alls (a product copied from the banner, or none), which nmap's specific rules
should beat.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

from .pcre import UnsupportedPattern, pcre_to_python
from .sanitize import sanitize

NULL_PROBE = "NULL"
NMAP_MATCH_WINDOW = 4096
BUILTIN_RESOURCE = "fingerprint-signatures.txt"
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
    pattern: re.Pattern[bytes]
    soft: bool
    product: str = ""
    version: str = ""
    info: str = ""
    hostname: str = ""
    os: str = ""
    device: str = ""
    source: str = "builtin"
    line_no: int = 0

    def match(self, data: bytes) -> Found | None:
        found = self.pattern.search(data)
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
class SignatureDB:
    """Probes and rules, in priority order. Immutable; `merged_with_nmap` returns a new one."""

    probes: tuple[Probe, ...]
    rules: tuple[tuple[str, Rule], ...]  # (probe name, rule) in file order
    excluded: PortRanges = PortRanges()
    skipped_nmap_rules: int = 0
    nmap_rules: int = 0
    _rules_cache: dict[tuple[str, bool], tuple[Rule, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _services_cache: dict[str, frozenset[str]] = field(
        default_factory=dict, compare=False, repr=False
    )

    # -- construction -------------------------------------------------------------------

    @classmethod
    def builtin(cls) -> SignatureDB:
        """The database shipped with the package (parsed once, then shared)."""
        return _builtin()

    @classmethod
    def from_text(cls, text: str, *, source: str = "signatures") -> SignatureDB:
        """Parse a database in the built-in dialect; raises `SignatureError` on a bad line."""
        return _Parser(text, "builtin", source).database()

    @classmethod
    def from_nmap_text(cls, text: str, *, source: str = "nmap-service-probes") -> SignatureDB:
        """Parse nmap's dialect; unusable rules are counted in `skipped_nmap_rules`."""
        return _Parser(text, "nmap", source).database()

    def merged_with_nmap(self, path: Path) -> SignatureDB:
        """This database followed by the TCP probes and rules of nmap's file at `path`.

        Our probes and rules keep priority; a probe both define (NULL) gets nmap's rules
        after ours.
        """
        text = Path(path).read_text(encoding="latin-1")
        return self.merged(self.from_nmap_text(text, source=str(path)))

    def merged(self, other: SignatureDB) -> SignatureDB:
        by_name = {probe.name: probe for probe in self.probes}
        probes = list(self.probes)
        for probe in other.probes:
            if probe.name not in by_name:
                probes.append(probe)
        probes = [replace(probe, order=index) for index, probe in enumerate(probes)]
        return SignatureDB(
            probes=tuple(probes),
            rules=self.rules + other.rules,
            excluded=self.excluded | other.excluded,
            skipped_nmap_rules=self.skipped_nmap_rules + other.skipped_nmap_rules,
            nmap_rules=self.nmap_rules + other.nmap_rules,
        )

    # -- queries --------------------------------------------------------------------------

    def probe(self, name: str) -> Probe | None:
        return next((probe for probe in self.probes if probe.name == name), None)

    def rules_for(self, probe_name: str, *, quick: bool = False) -> tuple[Rule, ...]:
        """The rules an answer to `probe_name` is tried against, in order: the probe's own,
        its fallbacks', the NULL probe's. Built-in rules that name a product come first,
        then nmap's, then the built-in catch-alls; `quick` leaves nmap's out."""
        key = (probe_name, quick)
        cached = self._rules_cache.get(key)
        if cached is not None:
            return cached
        probe = self.probe(probe_name)
        names = [probe_name, *(probe.fallback if probe else ())]
        if NULL_PROBE not in names:
            names.append(NULL_PROBE)
        ordered = [rule for name in names for owner, rule in self.rules if owner == name]
        if quick:
            ordered = [rule for rule in ordered if rule.source == "builtin"]
        rules = tuple(sorted(ordered, key=_rank))  # stable: file order within a rank
        self._rules_cache[key] = rules
        return rules

    def match(self, probe_name: str, data: bytes, *, quick: bool = False) -> Found | None:
        """The best rule for `data`: the first hard match, else the first soft one.

        `quick` tries only the built-in rules, cheap enough to run on every chunk as an
        answer arrives. nmap's rules only see the first `NMAP_MATCH_WINDOW` bytes: a few of
        its patterns backtrack quadratically, and identifying data comes first anyway.
        """
        if not data:
            return None
        window = data[:NMAP_MATCH_WINDOW]
        soft: Found | None = None
        for rule in self.rules_for(probe_name, quick=quick):
            if soft is not None and (rule.soft or rule.service != soft.service):
                # After a soft match only a hard match naming the same service can improve it.
                continue
            found = rule.match(data if rule.source == "builtin" else window)
            if found is None:
                continue
            if not found.soft:
                return found
            soft = found
        return soft

    def tls_first(self, port: int) -> bool:
        """Whether a TLS handshake is the first thing to try on `port`."""
        return any(
            port in probe.ssl_ports or (probe.tls_handshake and port in probe.ports)
            for probe in self.probes
        )

    def plan(self, port: int, intensity: int) -> list[Probe]:
        """Probes to send on `port` after the banner wait, in order (NULL excluded).

        Probes that name the port come first (a TLS handshake before them on TLS ports),
        then the others by rarity up to `intensity`. An `Exclude`d port gets no probes.
        """
        if port in self.excluded:
            return []
        candidates = [p for p in self.probes if p.name != NULL_PROBE]
        named = [p for p in candidates if port in p.ports and not p.tls_handshake]
        if self.tls_first(port):
            named = [p for p in candidates if p.tls_handshake] + named
        return _ordered(named, candidates, intensity)

    def inner_plan(self, port: int, intensity: int) -> list[Probe]:
        """Probes to send inside a TLS session on `port`."""
        if port in self.excluded:
            return []
        candidates = [p for p in self.probes if p.name != NULL_PROBE and not p.tls_handshake]
        named = [p for p in candidates if port in p.ssl_ports]
        return _ordered(named, candidates, intensity)

    def banner_wait(self, port: int, *, inside_tls: bool, default: float) -> float:
        """How long to wait for a server-first banner on `port`.

        Longer where servers are known to speak first (the NULL probe's ports). Inside TLS,
        no wait where a probe is meant for the port: the request goes out at once, and a
        server that speaks first still answers it with its banner.
        """
        null = self.probe(NULL_PROBE)
        if null is not None and port in (null.ssl_ports if inside_tls else null.ports):
            return max(null.wait, default)
        if inside_tls and any(port in probe.ssl_ports for probe in self.probes):
            return 0.0
        return default

    def services_probed_by(self, probe: Probe) -> frozenset[str]:
        """Services a hard rule of `probe` itself (or of its fallbacks) can name."""
        cached = self._services_cache.get(probe.name)
        if cached is None:
            names = {probe.name, *probe.fallback}
            cached = frozenset(
                rule.service for owner, rule in self.rules if owner in names and not rule.soft
            )
            self._services_cache[probe.name] = cached
        return cached


def _rank(rule: Rule) -> int:
    if rule.source != "builtin":
        return 1
    # Soft rules stay in file order: they only name a service (or say "this is TLS"),
    # and any later hard rule for that service still refines them.
    generic = not rule.soft and (not rule.product or rule.product.startswith("$"))
    return 2 if generic else 0


def _ordered(named: list[Probe], candidates: list[Probe], intensity: int) -> list[Probe]:
    chosen = {probe.name for probe in named}
    rest = sorted(
        (p for p in candidates if p.name not in chosen and p.rarity <= intensity),
        key=lambda p: (p.rarity, p.order),
    )
    return [*named, *rest]


@cache
def _builtin() -> SignatureDB:
    text = resources.files("exporter").joinpath("data", BUILTIN_RESOURCE).read_text("utf-8")
    return _Parser(text, "builtin", BUILTIN_RESOURCE).database()


# -- templates --------------------------------------------------------------------------

_TEMPLATE = re.compile(
    r"\$(?:(\d)"
    r"|P\((\d)\)"
    r'|SUBST\((\d),"((?:[^"\\]|\\.)*)","((?:[^"\\]|\\.)*)"\)'
    r'|I\((\d),"([<>])"\))'
)


def _group(found: re.Match[bytes], index: int) -> bytes:
    try:
        return found.group(index) or b""
    except IndexError:
        return b""


def _expand(template: str, found: re.Match[bytes]) -> str:
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

    def database(self) -> SignatureDB:
        for line_no, raw in enumerate(self.text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            self.line(line_no, line)
        self.finish_probe()
        nmap = self.dialect == "nmap"
        return SignatureDB(
            probes=tuple(replace(probe, order=i) for i, probe in enumerate(self.probes)),
            rules=tuple(self.rules),
            excluded=self.excluded,
            skipped_nmap_rules=self.skipped if nmap else 0,
            nmap_rules=len(self.rules) if nmap else 0,
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
        flags = 0
        for option in options:
            if option == "i":
                flags |= re.IGNORECASE
            elif option == "s":
                flags |= re.DOTALL
            elif self.dialect == "builtin":
                raise self.error(line_no, f"unknown pattern option {option!r}")
        try:
            compiled = self.compile(pattern, flags)
        except (UnsupportedPattern, re.error, Warning) as exc:
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

    def compile(self, pattern: str, flags: int) -> re.Pattern[bytes]:
        text = pcre_to_python(pattern) if self.dialect == "nmap" else pattern
        with warnings.catch_warnings():
            # FutureWarning about set syntax would otherwise print for third-party patterns.
            warnings.simplefilter("error")
            return re.compile(text.encode("latin-1"), flags)
