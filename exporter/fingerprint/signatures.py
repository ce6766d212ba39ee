"""The signature database: which probes to send, and what their answers mean.

The probes and rules come from files in nmap's probe format (`probefile.py`): the built-in
database, optionally merged with nmap's `nmap-service-probes`, whose rules that cannot run are
counted in `SignatureDB.skipped_nmap_rules`.

Matching follows nmap: the answer to a probe is tried against that probe's rules, then against
the rules of its `fallback` probes, then against the NULL probe's rules (what a server says
unprompted can arrive after any request). The first hard `match` wins; a `softmatch` only names
the service, and a later hard match for the same service replaces it. In a merged database our
rules that name a product come first (they are written for stable identities), then nmap's,
then our catch-alls (a product copied from the banner, or none), which nmap's specific rules
should beat.

Answers come from servers we do not control, and a few of nmap's patterns backtrack badly on
the wrong input, so matching is bounded twice: one rule may run for `RULE_TIME_LIMIT` seconds
(past that it counts as not matching) and one call of `SignatureDB.match` for
`MATCH_TIME_LIMIT` seconds (past that the best match so far is the answer). nmap's rules also
only see the first `NMAP_MATCH_WINDOW` bytes: identifying data comes first, and the window
keeps the usual cost of trying some 11,000 patterns low.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path

from .probefile import Found, PortRanges, Probe, ProbeFile, Rule, parse

NULL_PROBE = "NULL"
NMAP_MATCH_WINDOW = 4096
RULE_TIME_LIMIT = 0.1  # seconds one rule may take on one answer
MATCH_TIME_LIMIT = 1.0  # seconds one answer may take against all rules
BUILTIN_RESOURCE = "fingerprint-signatures.txt"


@dataclass(frozen=True, slots=True)
class SignatureDB:
    """Probes and rules, in priority order. Immutable; `merged_with_nmap` returns a new one."""

    probes: tuple[Probe, ...]
    rules: tuple[tuple[str, Rule], ...]  # (probe name, rule) in file order
    excluded: PortRanges = field(default_factory=PortRanges)
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
        return cls._of(parse(text, "builtin", source))

    @classmethod
    def from_nmap_text(cls, text: str, *, source: str = "nmap-service-probes") -> SignatureDB:
        """Parse nmap's dialect; unusable rules are counted in `skipped_nmap_rules`."""
        return cls._of(parse(text, "nmap", source), nmap=True)

    @classmethod
    def _of(cls, probe_file: ProbeFile, *, nmap: bool = False) -> SignatureDB:
        return cls(
            probes=probe_file.probes,
            rules=probe_file.rules,
            excluded=probe_file.excluded,
            skipped_nmap_rules=probe_file.skipped if nmap else 0,
            nmap_rules=len(probe_file.rules) if nmap else 0,
        )

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
        answer arrives. Time is bounded as the module says: a rule that runs out of time does
        not match, and when the whole call runs out the best match so far is returned.
        """
        if not data:
            return None
        window = data[:NMAP_MATCH_WINDOW]
        deadline = time.monotonic() + MATCH_TIME_LIMIT
        soft: Found | None = None
        for rule in self.rules_for(probe_name, quick=quick):
            if soft is not None and (rule.soft or rule.service != soft.service):
                # After a soft match only a hard match naming the same service can improve it.
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                found = rule.match(
                    data if rule.source == "builtin" else window, min(left, RULE_TIME_LIMIT)
                )
            except TimeoutError:
                continue
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
    return SignatureDB.from_text(text, source=BUILTIN_RESOURCE)
