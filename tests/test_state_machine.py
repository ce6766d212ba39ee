"""Table-driven tests of the pure per-host state machine (exporter.state).

Each case is a sequence of scans (and operator actions) applied to a fresh host; after every
item the emitted events, the per-port gauges of every port that matters and the host status are
compared with the table. Gauges are written as compact flag strings:

    open       confirmed open              exp      in the baseline / expected list
    NEW        unexpected_open in force    CLOSED   expected_closed in force
    CHANGED    service_changed in force    pending=NEW|CLOSED|CHANGED|BACK (BACK: return)
    svc=...    confirmed identity (service/product/version, "?" when unidentified)
"""

from __future__ import annotations

import ast
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import exporter.state
from exporter.model import (
    UNKNOWN_SERVICE,
    HostScan,
    ScanResult,
    ServiceIdentity,
    TLSInfo,
    decode_fingerprint,
    encode_fingerprint,
)
from exporter.state import (
    RETURN_TO_BASELINE,
    AcceptRefused,
    BaselineSource,
    Event,
    EventKind,
    HostState,
    HostStatus,
    InvalidInput,
    PortStatus,
    Transition,
    accept,
    derive_changes,
    host_status,
    port_statuses,
    ports_that_matter,
    reconfigure,
    step,
)

HOST = "web1.example.org"
T0 = 1_700_000_000.0
PORTS = range(1, 10001)
LOW = range(1, 1025)
UNREACHABLE = "unreachable"
ERROR = "error"

SHORT = {
    EventKind.PORT_NEW_OPEN: "NEW",
    EventKind.PORT_NOW_CLOSED: "CLOSED",
    EventKind.PORT_SERVICE_CHANGED: "CHANGED",
    EventKind.BASELINE_LEARNED: "LEARNED",
    EventKind.BASELINE_ACCEPTED: "ACCEPTED",
}
SHORT_PENDING = {k.value: v for k, v in SHORT.items()} | {RETURN_TO_BASELINE: "BACK"}


def ident(spec: str) -> ServiceIdentity:
    """ "ssh/OpenSSH/9.2p1" -> ServiceIdentity; "?" -> unidentified."""
    if spec == "?":
        return UNKNOWN_SERVICE
    service, _, rest = spec.partition("/")
    product, _, version = rest.partition("/")
    return ServiceIdentity(service, product, version, banner=f"banner of {spec}")


def spec_of(identity: ServiceIdentity) -> str:
    if identity.service == "unknown":
        return "?"
    return "/".join(x for x in (identity.service, identity.product, identity.version) if x)


def make_scan(
    i: int,
    spec: Mapping[int, str] | str,
    *,
    closed: tuple[int, ...] = (),
    filtered: tuple[int, ...] = (),
    scanned: Collection[int] = PORTS,
) -> HostScan:
    started = T0 + 600 * i
    if spec == UNREACHABLE:
        result = ScanResult(HOST, "192.0.2.10", started, 30.0, len(scanned), answered=False)
        return HostScan(result)
    if spec == ERROR:
        result = ScanResult(HOST, None, started, 0.0, 0, answered=False, error="no address")
        return HostScan(result)
    assert isinstance(spec, Mapping)
    result = ScanResult(
        HOST,
        "192.0.2.10",
        started,
        4.0,
        len(scanned),
        answered=True,
        open=tuple(sorted(spec)),
        closed=closed,
        filtered=filtered,
    )
    return HostScan(result, {p: ident(s) for p, s in spec.items()})


@dataclass(frozen=True)
class Scan:
    open: Mapping[int, str] | str
    events: tuple[str, ...] = ()
    ports: Mapping[int, str] = field(default_factory=dict)
    status: HostStatus = HostStatus.STABLE
    filtered: tuple[int, ...] = ()
    scanned: Collection[int] = PORTS
    hurry: bool | None = None  # expected Transition.needs_confirmation, when given


@dataclass(frozen=True)
class Accept:
    port: int | None = None
    events: tuple[str, ...] = ()
    ports: Mapping[int, str] = field(default_factory=dict)
    status: HostStatus = HostStatus.STABLE


@dataclass(frozen=True)
class Reload:
    expected_open: tuple[int, ...] | None
    events: tuple[str, ...] = ()
    ports: Mapping[int, str] = field(default_factory=dict)
    status: HostStatus = HostStatus.STABLE


@dataclass(frozen=True)
class Case:
    name: str
    steps: tuple[Scan | Accept | Reload, ...]
    expected_open: tuple[int, ...] | None = None
    confirmations: int = 2


def render_event(event: Event) -> str:
    parts = [SHORT[event.kind]]
    if event.port is not None:
        parts.append(str(event.port))
    if event.resolved:
        parts.append("resolved")
    return ":".join(parts)


def render_port(status: PortStatus) -> str:
    tokens = []
    if status.open:
        tokens.append("open")
    if status.expected:
        tokens.append("exp")
    if status.change is not None:
        tokens.append(SHORT[status.change])
    if status.pending is not None:
        tokens.append(f"pending={SHORT_PENDING[status.pending]}")
    if status.open and status.identity is not None:
        tokens.append(f"svc={spec_of(status.identity)}")
    return " ".join(tokens)


def check_invariants(state: HostState, confirmations: int) -> None:
    in_force = {p: (c.kind, c.old, c.new) for p, c in state.in_force.items()}
    assert in_force == derive_changes(state.baseline, state.confirmed)
    assert all(0 < p.count < confirmations for p in state.pending.values())
    for port, pending in state.pending.items():
        current = state.in_force.get(port)
        assert pending.target != (None if current is None else current.target)
    assert set(state.last_change) <= set(ports_that_matter(state))
    # A status view can always be built: every in-force kind maps to exactly one gauge.
    for view in port_statuses(state):
        flags = (view.unexpected_open, view.expected_closed, view.service_changed)
        assert sum(flags) == (view.change is not None)


def run_case(case: Case) -> HostState:
    state = HostState.initial(HOST)
    expected = case.expected_open
    for i, item in enumerate(case.steps):
        where = f"{case.name}, item {i}: {item}"
        at = T0 + 600 * i + 100
        transition: Transition
        if isinstance(item, Scan):
            scan = make_scan(i, item.open, filtered=item.filtered, scanned=item.scanned)
            transition = step(
                state,
                scan,
                expected_open=expected,
                scanned_ports=item.scanned,
                confirmations=case.confirmations,
            )
            if item.hurry is not None:
                assert transition.needs_confirmation is item.hurry, where
            for event in transition.events:
                assert event.at == scan.scan.started + scan.scan.duration_seconds
        elif isinstance(item, Accept):
            transition = accept(state, item.port, at=at)
        else:
            expected = item.expected_open
            transition = reconfigure(state, expected, at=at)
        assert transition.previous is state
        state = transition.new_state
        assert tuple(render_event(e) for e in transition.events) == item.events, where
        assert {v.port: render_port(v) for v in port_statuses(state)} == dict(item.ports), where
        assert host_status(state) is item.status, where
        check_invariants(state, case.confirmations)
    return state


SSH, HTTP = "ssh/OpenSSH/9.2p1", "http/nginx/1.22.1"
P = HostStatus.PENDING
C = HostStatus.CHANGED
U = HostStatus.UNREACHABLE
N = HostStatus.UNKNOWN

CASES = [
    Case(
        "first successful scan learns the baseline",
        (
            Scan(
                {22: SSH, 80: HTTP},
                ("LEARNED",),
                {22: f"open exp svc={SSH}", 80: f"open exp svc={HTTP}"},
            ),
        ),
    ),
    Case(
        "unreachable before any baseline learns nothing",
        (
            Scan(UNREACHABLE, status=U),
            Scan(ERROR, status=U),
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
        ),
    ),
    Case(
        "new port: pending after one scan, confirmed after two, resolved after two",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}, hurry=False),
            Scan(
                {22: SSH, 8080: HTTP},
                (),
                {22: f"open exp svc={SSH}", 8080: "pending=NEW"},
                P,
                hurry=True,
            ),
            Scan(
                {22: SSH, 8080: HTTP},
                ("NEW:8080",),
                {22: f"open exp svc={SSH}", 8080: f"open NEW svc={HTTP}"},
                C,
                hurry=False,
            ),
            Scan(
                {22: SSH},
                (),
                {22: f"open exp svc={SSH}", 8080: f"open NEW pending=BACK svc={HTTP}"},
                C,
                hurry=True,
            ),
            Scan({22: SSH}, ("NEW:8080:resolved",), {22: f"open exp svc={SSH}"}, hurry=False),
        ),
    ),
    Case(
        "one flapping scan never flips a gauge",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({22: SSH, 8080: HTTP}, (), {22: f"open exp svc={SSH}", 8080: "pending=NEW"}, P),
            Scan({22: SSH}, (), {22: f"open exp svc={SSH}"}),
            Scan({}, (), {22: f"open exp pending=CLOSED svc={SSH}"}, P),
            Scan({22: SSH}, (), {22: f"open exp svc={SSH}"}),
            Scan({22: HTTP}, (), {22: f"open exp pending=CHANGED svc={SSH}"}, P),
            Scan({22: SSH}, (), {22: f"open exp svc={SSH}"}),
        ),
    ),
    Case(
        "baseline port closed: expected_closed after two scans, back after two more",
        (
            Scan(
                {22: SSH, 80: HTTP},
                ("LEARNED",),
                {22: f"open exp svc={SSH}", 80: f"open exp svc={HTTP}"},
            ),
            Scan(
                {22: SSH},
                (),
                {22: f"open exp svc={SSH}", 80: f"open exp pending=CLOSED svc={HTTP}"},
                P,
            ),
            Scan({22: SSH}, ("CLOSED:80",), {22: f"open exp svc={SSH}", 80: "exp CLOSED"}, C),
            Scan({22: SSH}, (), {22: f"open exp svc={SSH}", 80: "exp CLOSED"}, C),
            Scan(
                {22: SSH, 80: HTTP},
                (),
                {22: f"open exp svc={SSH}", 80: "exp CLOSED pending=BACK"},
                C,
            ),
            Scan(
                {22: SSH, 80: HTTP},
                ("CLOSED:80:resolved",),
                {22: f"open exp svc={SSH}", 80: f"open exp svc={HTTP}"},
            ),
        ),
    ),
    Case(
        "a filtered port is not open",
        (
            Scan(
                {22: SSH, 80: HTTP},
                ("LEARNED",),
                {22: f"open exp svc={SSH}", 80: f"open exp svc={HTTP}"},
            ),
            Scan(
                {22: SSH},
                (),
                {22: f"open exp svc={SSH}", 80: f"open exp pending=CLOSED svc={HTTP}"},
                P,
                filtered=(80,),
            ),
            Scan(
                {22: SSH},
                ("CLOSED:80",),
                {22: f"open exp svc={SSH}", 80: "exp CLOSED"},
                C,
                filtered=(80,),
            ),
        ),
    ),
    Case(
        "a port outside the scanned port set is not closed",
        (
            Scan(
                {22: SSH, 8443: HTTP},
                ("LEARNED",),
                {22: f"open exp svc={SSH}", 8443: f"open exp svc={HTTP}"},
                scanned=range(1, 65536),
            ),
            Scan(
                {22: SSH},
                (),
                {22: f"open exp svc={SSH}", 8443: f"open exp svc={HTTP}"},
                scanned=LOW,
            ),
            Scan(
                {22: SSH},
                (),
                {22: f"open exp svc={SSH}", 8443: f"open exp svc={HTTP}"},
                scanned=LOW,
            ),
            # ... but a port the scanner reports open counts wherever it came from.
            Scan(
                {22: SSH, 8443: HTTP, 9000: "?"},
                (),
                {22: f"open exp svc={SSH}", 8443: f"open exp svc={HTTP}", 9000: "pending=NEW"},
                P,
                scanned=LOW,
            ),
            # Not reported by a scan that did not probe it: the pending change is dropped.
            Scan(
                {22: SSH},
                (),
                {22: f"open exp svc={SSH}", 8443: f"open exp svc={HTTP}"},
                scanned=LOW,
            ),
            Scan(
                {22: SSH},
                (),
                {22: f"open exp svc={SSH}", 8443: f"open exp pending=CLOSED svc={HTTP}"},
                P,
            ),
            # A port set that no longer covers a pending port drops the pending change.
            Scan(
                {22: SSH},
                (),
                {22: f"open exp svc={SSH}", 8443: f"open exp svc={HTTP}"},
                scanned=LOW,
                hurry=False,
            ),
        ),
    ),
    Case(
        "unreachable host: no port events, pending neither advanced nor reset",
        (
            Scan(
                {22: SSH, 80: HTTP},
                ("LEARNED",),
                {22: f"open exp svc={SSH}", 80: f"open exp svc={HTTP}"},
            ),
            Scan(
                UNREACHABLE,
                (),
                {22: f"open exp svc={SSH}", 80: f"open exp svc={HTTP}"},
                U,
                hurry=False,
            ),
            Scan(UNREACHABLE, (), {22: f"open exp svc={SSH}", 80: f"open exp svc={HTTP}"}, U),
            Scan(
                {22: SSH, 8080: HTTP},
                (),
                {
                    22: f"open exp svc={SSH}",
                    80: f"open exp pending=CLOSED svc={HTTP}",
                    8080: "pending=NEW",
                },
                P,
            ),
            Scan(
                UNREACHABLE,
                (),
                {
                    22: f"open exp svc={SSH}",
                    80: f"open exp pending=CLOSED svc={HTTP}",
                    8080: "pending=NEW",
                },
                U,
                hurry=False,
            ),
            Scan(
                ERROR,
                (),
                {
                    22: f"open exp svc={SSH}",
                    80: f"open exp pending=CLOSED svc={HTTP}",
                    8080: "pending=NEW",
                },
                U,
            ),
            Scan(
                {22: SSH, 8080: HTTP},
                ("CLOSED:80", "NEW:8080"),
                {22: f"open exp svc={SSH}", 80: "exp CLOSED", 8080: f"open NEW svc={HTTP}"},
                C,
            ),
            Scan(
                UNREACHABLE,
                (),
                {22: f"open exp svc={SSH}", 80: "exp CLOSED", 8080: f"open NEW svc={HTTP}"},
                U,
            ),
        ),
    ),
    Case(
        "service changed, confirmed, then changed back",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({22: "ssh/OpenSSH/9.6"}, (), {22: f"open exp pending=CHANGED svc={SSH}"}, P),
            Scan(
                {22: "ssh/OpenSSH/9.6"},
                ("CHANGED:22",),
                {22: "open exp CHANGED svc=ssh/OpenSSH/9.6"},
                C,
            ),
            Scan({22: SSH}, (), {22: "open exp CHANGED pending=BACK svc=ssh/OpenSSH/9.6"}, C),
            Scan({22: SSH}, ("CHANGED:22:resolved",), {22: f"open exp svc={SSH}"}),
        ),
    ),
    Case(
        "two scans that see different new services do not agree",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({22: "ssh/OpenSSH/9.6"}, (), {22: f"open exp pending=CHANGED svc={SSH}"}, P),
            Scan({22: "ssh/dropbear/2022"}, (), {22: f"open exp pending=CHANGED svc={SSH}"}, P),
            Scan(
                {22: "ssh/dropbear/2022"},
                ("CHANGED:22",),
                {22: "open exp CHANGED svc=ssh/dropbear/2022"},
                C,
            ),
            Scan(
                {22: "ssh/OpenSSH/9.6"},
                (),
                {22: "open exp CHANGED pending=CHANGED svc=ssh/dropbear/2022"},
                C,
            ),
            Scan(
                {22: "ssh/OpenSSH/9.6"},
                ("CHANGED:22",),
                {22: "open exp CHANGED svc=ssh/OpenSSH/9.6"},
                C,
            ),
        ),
    ),
    Case(
        "a changed service that then closes becomes expected_closed",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({22: HTTP}, (), {22: f"open exp pending=CHANGED svc={SSH}"}, P),
            Scan({22: HTTP}, ("CHANGED:22",), {22: f"open exp CHANGED svc={HTTP}"}, C),
            Scan({}, (), {22: f"open exp CHANGED pending=CLOSED svc={HTTP}"}, C),
            Scan({}, ("CLOSED:22",), {22: "exp CLOSED"}, C),
        ),
    ),
    Case(
        "a closed port that comes back with another service",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({}, (), {22: f"open exp pending=CLOSED svc={SSH}"}, P),
            Scan({}, ("CLOSED:22",), {22: "exp CLOSED"}, C),
            Scan({22: HTTP}, (), {22: "exp CLOSED pending=CHANGED"}, C),
            Scan({22: HTTP}, ("CHANGED:22",), {22: f"open exp CHANGED svc={HTTP}"}, C),
        ),
    ),
    Case(
        "a closed port that comes back unidentified returns to the baseline",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({}, (), {22: f"open exp pending=CLOSED svc={SSH}"}, P),
            Scan({}, ("CLOSED:22",), {22: "exp CLOSED"}, C),
            Scan({22: "?"}, (), {22: "exp CLOSED pending=BACK"}, C),
            Scan({22: "?"}, ("CLOSED:22:resolved",), {22: "open exp svc=?"}),
            # The reference is still the one learned: a known other service is a change.
            Scan({22: HTTP}, (), {22: "open exp pending=CHANGED svc=?"}, P),
            Scan({22: SSH}, (), {22: f"open exp svc={SSH}"}),
        ),
    ),
    Case(
        "an unidentified scan neither causes, advances nor resets a service change",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({22: "?"}, (), {22: f"open exp svc={SSH}"}),
            Scan({22: HTTP}, (), {22: f"open exp pending=CHANGED svc={SSH}"}, P),
            Scan({22: "?"}, (), {22: f"open exp pending=CHANGED svc={SSH}"}, P),
            Scan({22: HTTP}, ("CHANGED:22",), {22: f"open exp CHANGED svc={HTTP}"}, C),
            Scan({22: SSH}, (), {22: f"open exp CHANGED pending=BACK svc={HTTP}"}, C),
            Scan({22: "?"}, (), {22: f"open exp CHANGED pending=BACK svc={HTTP}"}, C),
            Scan({22: SSH}, ("CHANGED:22:resolved",), {22: f"open exp svc={SSH}"}),
        ),
    ),
    Case(
        "an unidentified scan of an open port clears a pending close",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({}, (), {22: f"open exp pending=CLOSED svc={SSH}"}, P),
            Scan({22: "?"}, (), {22: f"open exp svc={SSH}"}),
            Scan({}, (), {22: f"open exp pending=CLOSED svc={SSH}"}, P),
        ),
    ),
    Case(
        "a baseline port learned unidentified takes the first identity seen, silently",
        (
            Scan({22: "?"}, ("LEARNED",), {22: "open exp svc=?"}),
            Scan({22: "?"}, (), {22: "open exp svc=?"}),
            Scan({22: SSH}, (), {22: f"open exp svc={SSH}"}),
            Scan({22: HTTP}, (), {22: f"open exp pending=CHANGED svc={SSH}"}, P),
        ),
    ),
    Case(
        "a new port is confirmed whatever service answers on it",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({22: SSH, 9000: "?"}, (), {22: f"open exp svc={SSH}", 9000: "pending=NEW"}, P),
            Scan(
                {22: SSH, 9000: HTTP},
                ("NEW:9000",),
                {22: f"open exp svc={SSH}", 9000: f"open NEW svc={HTTP}"},
                C,
            ),
            Scan(
                {22: SSH, 9000: "?"},
                (),
                {22: f"open exp svc={SSH}", 9000: f"open NEW svc={HTTP}"},
                C,
            ),
            Scan(
                {22: SSH, 9000: SSH},
                (),
                {22: f"open exp svc={SSH}", 9000: f"open NEW svc={SSH}"},
                C,
            ),
        ),
    ),
    Case(
        "confirmations=1 confirms at once",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan(
                {22: SSH, 8080: HTTP},
                ("NEW:8080",),
                {22: f"open exp svc={SSH}", 8080: f"open NEW svc={HTTP}"},
                C,
                hurry=False,
            ),
            Scan({}, ("CLOSED:22", "NEW:8080:resolved"), {22: "exp CLOSED"}, C),
            Scan({22: SSH}, ("CLOSED:22:resolved",), {22: f"open exp svc={SSH}"}),
        ),
        confirmations=1,
    ),
    Case(
        "confirmations=3 needs three agreeing scans in a row",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({22: SSH, 8080: HTTP}, (), {22: f"open exp svc={SSH}", 8080: "pending=NEW"}, P),
            Scan({22: SSH, 8080: HTTP}, (), {22: f"open exp svc={SSH}", 8080: "pending=NEW"}, P),
            Scan({22: SSH}, (), {22: f"open exp svc={SSH}"}),
            Scan({22: SSH, 8080: HTTP}, (), {22: f"open exp svc={SSH}", 8080: "pending=NEW"}, P),
            Scan({22: SSH, 8080: HTTP}, (), {22: f"open exp svc={SSH}", 8080: "pending=NEW"}, P),
            Scan(
                {22: SSH, 8080: HTTP},
                ("NEW:8080",),
                {22: f"open exp svc={SSH}", 8080: f"open NEW svc={HTTP}"},
                C,
            ),
        ),
        confirmations=3,
    ),
    Case(
        "accept for the whole host moves the baseline to the confirmed state",
        (
            Scan(
                {22: SSH, 80: HTTP},
                ("LEARNED",),
                {22: f"open exp svc={SSH}", 80: f"open exp svc={HTTP}"},
            ),
            Scan(
                {22: "ssh/OpenSSH/9.6", 8080: HTTP},
                (),
                {
                    22: f"open exp pending=CHANGED svc={SSH}",
                    80: f"open exp pending=CLOSED svc={HTTP}",
                    8080: "pending=NEW",
                },
                P,
            ),
            Scan(
                {22: "ssh/OpenSSH/9.6", 8080: HTTP},
                ("CHANGED:22", "CLOSED:80", "NEW:8080"),
                {
                    22: "open exp CHANGED svc=ssh/OpenSSH/9.6",
                    80: "exp CLOSED",
                    8080: f"open NEW svc={HTTP}",
                },
                C,
            ),
            Accept(
                None,
                ("ACCEPTED:22", "ACCEPTED:80", "ACCEPTED:8080"),
                {22: "open exp svc=ssh/OpenSSH/9.6", 8080: f"open exp svc={HTTP}"},
            ),
            Scan(
                {22: "ssh/OpenSSH/9.6", 8080: HTTP},
                (),
                {22: "open exp svc=ssh/OpenSSH/9.6", 8080: f"open exp svc={HTTP}"},
            ),
            Scan(
                {22: "ssh/OpenSSH/9.6"},
                (),
                {22: "open exp svc=ssh/OpenSSH/9.6", 8080: f"open exp pending=CLOSED svc={HTTP}"},
                P,
            ),
            Accept(
                None,
                ("ACCEPTED",),
                {22: "open exp svc=ssh/OpenSSH/9.6", 8080: f"open exp svc={HTTP}"},
            ),
        ),
    ),
    Case(
        "accept of one port leaves the other changes in force",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan(
                {22: HTTP, 8080: HTTP},
                (),
                {22: f"open exp pending=CHANGED svc={SSH}", 8080: "pending=NEW"},
                P,
            ),
            Scan(
                {22: HTTP, 8080: HTTP},
                ("CHANGED:22", "NEW:8080"),
                {22: f"open exp CHANGED svc={HTTP}", 8080: f"open NEW svc={HTTP}"},
                C,
            ),
            Accept(
                8080,
                ("ACCEPTED:8080",),
                {22: f"open exp CHANGED svc={HTTP}", 8080: f"open exp svc={HTTP}"},
                C,
            ),
            Accept(
                22, ("ACCEPTED:22",), {22: f"open exp svc={HTTP}", 8080: f"open exp svc={HTTP}"}
            ),
            Scan(
                {22: SSH, 8080: HTTP},
                (),
                {22: f"open exp pending=CHANGED svc={HTTP}", 8080: f"open exp svc={HTTP}"},
                P,
            ),
        ),
    ),
    Case(
        "accept drops pending changes of the accepted ports",
        (
            Scan({22: SSH}, ("LEARNED",), {22: f"open exp svc={SSH}"}),
            Scan({22: SSH, 8080: HTTP}, (), {22: f"open exp svc={SSH}", 8080: "pending=NEW"}, P),
            Accept(8080, ("ACCEPTED:8080",), {22: f"open exp svc={SSH}"}),
            Scan({22: SSH, 8080: HTTP}, (), {22: f"open exp svc={SSH}", 8080: "pending=NEW"}, P),
        ),
    ),
    Case(
        "expected list: it is the baseline, extra ports are new, identities fill in",
        (
            Scan(
                {22: SSH, 443: "https/nginx", 8080: HTTP},
                (),
                {22: f"open exp svc={SSH}", 443: "open exp svc=https/nginx", 8080: "pending=NEW"},
                P,
            ),
            Scan(
                {22: SSH, 443: "https/nginx", 8080: HTTP},
                ("NEW:8080",),
                {
                    22: f"open exp svc={SSH}",
                    443: "open exp svc=https/nginx",
                    8080: f"open NEW svc={HTTP}",
                },
                C,
            ),
            Scan(
                {22: SSH, 443: "https/caddy"},
                (),
                {
                    22: f"open exp svc={SSH}",
                    443: "open exp pending=CHANGED svc=https/nginx",
                    8080: f"open NEW pending=BACK svc={HTTP}",
                },
                C,
            ),
        ),
        expected_open=(22, 443),
    ),
    Case(
        "expected list: an expected port that is closed is confirmed after two scans",
        (
            Scan(
                {22: SSH}, (), {22: f"open exp svc={SSH}", 443: "open exp pending=CLOSED svc=?"}, P
            ),
            Scan({22: SSH}, ("CLOSED:443",), {22: f"open exp svc={SSH}", 443: "exp CLOSED"}, C),
            Scan(
                {22: SSH, 443: "?"},
                (),
                {22: f"open exp svc={SSH}", 443: "exp CLOSED pending=BACK"},
                C,
            ),
            Scan(
                {22: SSH, 443: "https"},
                ("CLOSED:443:resolved",),
                {22: f"open exp svc={SSH}", 443: "open exp svc=https"},
            ),
            Scan(
                {22: SSH, 443: "imaps"},
                (),
                {22: f"open exp svc={SSH}", 443: "open exp pending=CHANGED svc=https"},
                P,
            ),
        ),
        expected_open=(22, 443),
    ),
    Case(
        "expected list: unreachable first scan keeps the list as baseline, no closes",
        (
            Scan(UNREACHABLE, (), {22: "open exp svc=?"}, U),
            Scan(UNREACHABLE, (), {22: "open exp svc=?"}, U),
            Scan({22: SSH}, (), {22: f"open exp svc={SSH}"}),
        ),
        expected_open=(22,),
    ),
    Case(
        "expected list changed by a reload: the new list is the baseline at once",
        (
            Scan(
                {22: SSH, 8080: HTTP},
                (),
                {
                    22: f"open exp svc={SSH}",
                    443: "open exp pending=CLOSED svc=?",
                    8080: "pending=NEW",
                },
                P,
            ),
            Scan(
                {22: SSH, 8080: HTTP},
                ("CLOSED:443", "NEW:8080"),
                {22: f"open exp svc={SSH}", 443: "exp CLOSED", 8080: f"open NEW svc={HTTP}"},
                C,
            ),
            Reload(
                (22, 8080),
                ("CLOSED:443:resolved", "NEW:8080:resolved"),
                {22: f"open exp svc={SSH}", 8080: f"open exp svc={HTTP}"},
            ),
            Reload(
                (8080, 9090),
                ("NEW:22", "CLOSED:9090"),
                {22: f"open NEW svc={SSH}", 8080: f"open exp svc={HTTP}", 9090: "exp CLOSED"},
                C,
            ),
            Scan(
                {8080: "http/apache"},
                (),
                {
                    22: f"open NEW pending=BACK svc={SSH}",
                    8080: f"open exp pending=CHANGED svc={HTTP}",
                    9090: "exp CLOSED",
                },
                C,
            ),
            Reload(
                (8080,),
                ("CLOSED:9090:resolved",),
                {
                    22: f"open NEW pending=BACK svc={SSH}",
                    8080: f"open exp pending=CHANGED svc={HTTP}",
                },
                C,
            ),
        ),
        expected_open=(22, 443),
    ),
    Case(
        "a changed expected port that leaves the list becomes a new port",
        (
            Scan({22: SSH}, (), {22: f"open exp svc={SSH}"}),
            Scan({22: HTTP}, (), {22: f"open exp pending=CHANGED svc={SSH}"}, P),
            Scan({22: HTTP}, ("CHANGED:22",), {22: f"open exp CHANGED svc={HTTP}"}, C),
            Reload((), ("NEW:22",), {22: f"open NEW svc={HTTP}"}, C),
        ),
        expected_open=(22,),
    ),
    Case(
        "learned baseline replaced by an expected list, then the list removed",
        (
            Scan(
                {22: SSH, 80: HTTP},
                ("LEARNED",),
                {22: f"open exp svc={SSH}", 80: f"open exp svc={HTTP}"},
            ),
            Reload((22,), ("NEW:80",), {22: f"open exp svc={SSH}", 80: f"open NEW svc={HTTP}"}, C),
            Reload(None, (), {22: f"open exp svc={SSH}", 80: f"open NEW svc={HTTP}"}, C),
            Accept(80, ("ACCEPTED:80",), {22: f"open exp svc={SSH}", 80: f"open exp svc={HTTP}"}),
        ),
    ),
    Case(
        "a reload that changes nothing emits nothing",
        (
            Scan({22: SSH}, (), {22: f"open exp svc={SSH}"}),
            Reload((22,), (), {22: f"open exp svc={SSH}"}),
        ),
        expected_open=(22,),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transitions(case: Case) -> None:
    run_case(case)


def test_host_status_before_any_scan() -> None:
    state = HostState.initial(HOST)
    assert host_status(state) is N
    assert port_statuses(state) == ()


def test_event_details_carry_services_and_severities() -> None:
    old = ServiceIdentity(
        "https", "nginx", "1.22", tls=TLSInfo("TLSv1.3", "CN=a", "CN=ca", ("a",), T0, "aa" * 32)
    )
    new = ServiceIdentity(
        "https", "nginx", "1.22", tls=TLSInfo("TLSv1.3", "CN=a", "CN=ca", ("a",), T0, "bb" * 32)
    )
    state = HostState.initial(HOST)
    scans = [{443: old}, {443: new}, {443: new}, {}, {}]
    events: list[Event] = []
    for i, services in enumerate(scans):
        result = ScanResult(HOST, "192.0.2.1", T0 + i, 1.0, 1000, True, open=tuple(services))
        transition = step(
            state, HostScan(result, services), expected_open=None, scanned_ports=PORTS
        )
        state = transition.new_state
        events.extend(transition.events)
    learned, changed, closed = events
    assert (learned.kind, learned.port, learned.severity) == (
        EventKind.BASELINE_LEARNED,
        None,
        "info",
    )
    assert state.baseline == {443: old.fingerprint}
    # A new certificate with the same product is a service change: the cert is in the fingerprint.
    assert (changed.kind, changed.severity, changed.old_service, changed.new_service) == (
        EventKind.PORT_SERVICE_CHANGED,
        "medium",
        old.fingerprint,
        new.fingerprint,
    )
    assert (changed.at, state.in_force[443].since) == (T0 + 3, T0 + 5)
    assert (closed.kind, closed.old_service, closed.new_service) == (
        EventKind.PORT_NOW_CLOSED,
        new.fingerprint,
        None,
    )
    assert state.in_force[443].old == old.fingerprint
    assert state.last_change == {443: T0 + 5}


def test_new_open_is_high_severity_and_banner_changes_are_not_changes() -> None:
    state = step(
        HostState.initial(HOST), make_scan(0, {22: SSH}), expected_open=None, scanned_ports=PORTS
    ).new_state
    for i in (1, 2):
        scan = make_scan(i, {22: SSH, 25: "smtp/Postfix"})
        scan.services[22] = ServiceIdentity("ssh", "OpenSSH", "9.2p1", banner=f"banner #{i}")
        transition = step(state, scan, expected_open=None, scanned_ports=PORTS)
        state = transition.new_state
    (event,) = transition.events
    assert (event.kind, event.severity, event.port, event.old_service) == (
        EventKind.PORT_NEW_OPEN,
        "high",
        25,
        None,
    )
    assert event.new_service == ident("smtp/Postfix").fingerprint
    assert state.confirmed[22].banner == "banner #2"  # the view shows the latest sighting
    assert 22 not in state.in_force and 22 not in state.pending


# --- service fingerprints --------------------------------------------------------------------

# (service, product, version, certificate SHA-256) pairs and whether they are the same identity.
# The first rows joined with "|" gave equal strings: the change between them went unseen.
FINGERPRINT_PAIRS: list[tuple[tuple[str, str, str, str], tuple[str, str, str, str], bool]] = [
    (("http", "a|b", "", ""), ("http", "a", "b|", ""), False),
    (("http", "a", "|b", ""), ("http", "a|", "b", ""), False),
    (("http", "", "a|b", ""), ("http", "a", "b", ""), False),
    (("x", "a", "", ""), ("x|a", "", "", ""), False),
    (("x", 'a"', "", ""), ("x", "a", '"', ""), False),
    (("x", "a\\", "", ""), ("x", "a", "\\", ""), False),
    (("x", "a,b", "", ""), ("x", "a", "b", ""), False),
    (("x", 'a","b', "", ""), ("x", "a", "b", ""), False),
    (("x", "\u00e9", "", ""), ("x", "\\u00e9", "", ""), False),
    (("https", "nginx", "1.24", "ab" * 32), ("https", "nginx", "1.24", "cd" * 32), False),
    (("https", "nginx", "1.24", ""), ("https", "nginx", "1.24", "ab" * 32), False),
    (("ssh", "OpenSSH", "9.2p1", ""), ("ssh", "OpenSSH", "9.2p1", ""), True),
    (("x", "\u00e9 \U0001f600", "", ""), ("x", "\u00e9 \U0001f600", "", ""), True),
]


def identity_of(fields: tuple[str, str, str, str]) -> ServiceIdentity:
    service, product, version, cert = fields
    tls = TLSInfo("TLSv1.3", "CN=a", "CN=ca", ("a",), T0, cert) if cert else None
    return ServiceIdentity(service, product, version, tls=tls, banner=repr(fields))


@pytest.mark.parametrize(("first", "second", "same"), FINGERPRINT_PAIRS)
def test_fingerprints_are_equal_exactly_for_equal_identities(
    first: tuple[str, str, str, str], second: tuple[str, str, str, str], same: bool
) -> None:
    a, b = identity_of(first), identity_of(second)
    assert (a.fingerprint == b.fingerprint) is same
    assert decode_fingerprint(a.fingerprint) == first
    assert decode_fingerprint(b.fingerprint) == second


def test_fingerprint_encoding_is_a_canonical_json_array() -> None:
    ssh = ServiceIdentity("ssh", "OpenSSH", "9.2p1", banner="SSH-2.0-OpenSSH_9.2p1")
    assert ssh.fingerprint == '["ssh","OpenSSH","9.2p1",""]'
    assert UNKNOWN_SERVICE.fingerprint == '["unknown","","",""]'
    assert encode_fingerprint("x", "caf\u00e9", "", "") == '["x","caf\\u00e9","",""]'
    fields = decode_fingerprint('["https","nginx","1.24","abab"]')
    assert (fields.service, fields.product, fields.version, fields.cert_sha256) == (
        "https",
        "nginx",
        "1.24",
        "abab",
    )
    # Only the one spelling is read: anything else would compare unequal to it later.
    for other in [
        "ssh|OpenSSH|9.2p1|",  # the `|`-joined form that schema migration 2 converts
        '["ssh", "OpenSSH", "9.2p1", ""]',
        '["ssh","OpenSSH","9.2p1"]',
        '["ssh","OpenSSH","9.2p1","",""]',
        '["ssh","OpenSSH","9.2p1",null]',
        '["x","caf\u00e9","",""]',  # not ASCII: the canonical form escapes it
        '["\\u0073sh","","",""]',  # an escape where none is needed
        '{"service":"ssh"}',
        '"ssh"',
        "",
        "[" * 100_000,
    ]:
        with pytest.raises(ValueError, match="not a service fingerprint"):
            decode_fingerprint(other)


AWKWARD = ["", "|", "||", '"', "\\", "\\|", ",", "[", "]", " ", "\n", "\x00", "\x7f", "\u00e9",
           "\u20ac", "\U0001f600", "\udc80", "\\u0041", "a", "OpenSSH", "9.2p1"]  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_fingerprint_round_trips_and_never_collides(seed: int) -> None:
    rng = random.Random(seed)
    seen: dict[str, tuple[str, str, str, str]] = {}

    def awkward() -> str:
        return "".join(rng.choices(AWKWARD, k=rng.randint(0, 3)))

    for _ in range(2000):
        fields = (awkward(), awkward(), awkward(), awkward())
        text = encode_fingerprint(*fields)
        assert text.isascii()
        assert decode_fingerprint(text) == fields
        assert identity_of(fields).fingerprint == text
        assert seen.setdefault(text, fields) == fields, "two identities share a fingerprint"


def test_a_change_between_identities_that_once_collided_is_seen() -> None:
    before = ServiceIdentity("http", "a", "b|")
    after = ServiceIdentity("http", "a|b", "")
    state = HostState.initial(HOST)
    events: list[Event] = []
    for i, identity in enumerate([before, after, after]):
        result = ScanResult(HOST, "192.0.2.1", T0 + 600 * i, 1.0, 1000, True, open=(80,))
        transition = step(
            state, HostScan(result, {80: identity}), expected_open=None, scanned_ports=PORTS
        )
        state = transition.new_state
        events.extend(transition.events)
    learned, changed = events
    assert learned.kind is EventKind.BASELINE_LEARNED
    assert (changed.kind, changed.old_service, changed.new_service) == (
        EventKind.PORT_SERVICE_CHANGED,
        before.fingerprint,
        after.fingerprint,
    )
    assert state.in_force[80].kind is EventKind.PORT_SERVICE_CHANGED


def test_accept_refusals() -> None:
    with pytest.raises(AcceptRefused, match="no baseline yet"):
        accept(HostState.initial(HOST), at=T0)
    expected_mode = step(
        HostState.initial(HOST), make_scan(0, {22: SSH}), expected_open=(22,), scanned_ports=PORTS
    ).new_state
    assert expected_mode.baseline_source is BaselineSource.EXPECTED
    with pytest.raises(AcceptRefused, match="expected-open list"):
        accept(expected_mode, at=T0)
    learned = step(
        HostState.initial(HOST), make_scan(0, {22: SSH}), expected_open=None, scanned_ports=PORTS
    ).new_state
    with pytest.raises(AcceptRefused, match="nothing known about port 23"):
        accept(learned, 23, at=T0)


def test_invalid_input() -> None:
    state = HostState.initial(HOST)
    with pytest.raises(InvalidInput, match="confirmations"):
        step(state, make_scan(0, {}), expected_open=None, scanned_ports=PORTS, confirmations=0)
    other = HostScan(ScanResult("other", None, T0, 0.0, 0, False, error="x"))
    with pytest.raises(InvalidInput, match="other"):
        step(state, other, expected_open=None, scanned_ports=PORTS)
    with pytest.raises(InvalidInput, match="1-65535"):
        reconfigure(state, (0, 22), at=T0)


def test_step_does_not_touch_its_input() -> None:
    state = step(
        HostState.initial(HOST), make_scan(0, {22: SSH}), expected_open=None, scanned_ports=PORTS
    ).new_state
    before = (
        dict(state.baseline),
        dict(state.confirmed),
        dict(state.pending),
        dict(state.in_force),
    )
    step(state, make_scan(1, {80: HTTP}), expected_open=None, scanned_ports=PORTS, confirmations=1)
    assert before == (
        dict(state.baseline),
        dict(state.confirmed),
        dict(state.pending),
        dict(state.in_force),
    )


SERVICES = ("?", SSH, "ssh/OpenSSH/9.6", HTTP, "http/apache")


def random_scan(rng: random.Random, i: int) -> HostScan:
    roll = rng.random()
    if roll < 0.08:
        return make_scan(i, UNREACHABLE)
    if roll < 0.1:
        return make_scan(i, ERROR)
    ports = rng.sample([22, 80, 443, 8080, 9000], rng.randint(0, 4))
    return make_scan(i, {p: rng.choice(SERVICES) for p in ports})


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("confirmations", [1, 2, 3])
def test_random_sequences_keep_the_invariants(seed: int, confirmations: int) -> None:
    rng = random.Random(seed)
    expected: tuple[int, ...] | None = rng.choice([None, (22, 80), (443,)])
    state = HostState.initial(HOST)
    for i in range(60):
        if rng.random() < 0.05:
            expected = rng.choice([None, (22, 80), (443,), (22, 443, 8080)])
        if rng.random() < 0.05 and state.baseline_source is BaselineSource.LEARNED:
            state = accept(state, None, at=T0 + 600 * i).new_state
        transition = step(
            state,
            random_scan(rng, i),
            expected_open=expected,
            scanned_ports=PORTS,
            confirmations=confirmations,
        )
        state = transition.new_state
        check_invariants(state, confirmations)
        for event in transition.events:
            assert event.port is None or event.port in (22, 80, 443, 8080, 9000)


@pytest.mark.parametrize("seed", range(30))
def test_isolated_deviations_never_confirm(seed: int) -> None:
    """Scans that each differ from the baseline once, with a normal scan in between, never alert."""
    rng = random.Random(seed)
    normal = {22: SSH, 80: HTTP}
    state = step(
        HostState.initial(HOST), make_scan(0, normal), expected_open=None, scanned_ports=PORTS
    ).new_state
    i = 0
    for _ in range(40):
        odd = dict(normal)
        for _ in range(rng.randint(1, 3)):
            port = rng.choice([22, 80, 443, 8080])
            if port in odd and rng.random() < 0.5:
                del odd[port]
            else:
                odd[port] = rng.choice(SERVICES)
        # A failed scan between the two keeps the pending change: the normal scan must reset it.
        sequence = [odd] + [UNREACHABLE] * rng.randint(0, 2) + [normal]
        for spec in sequence:
            i += 1
            transition = step(state, make_scan(i, spec), expected_open=None, scanned_ports=PORTS)
            state = transition.new_state
            assert transition.events == ()
            assert not state.in_force
        assert not state.pending


def test_the_state_machine_does_no_io() -> None:
    """exporter.state imports nothing that talks to the world or reads a clock."""
    allowed = {"__future__", "collections", "dataclasses", "enum", "exporter", "typing"}
    for path in Path(exporter.state.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                assert not name.startswith("exporter.") or name == "exporter.model", name
