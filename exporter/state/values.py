"""The values the state machine keeps per host and hands out per scan.

All of them are frozen. The mappings inside `HostState` are plain dicts that are never mutated
once the state is built: `step` and friends build new ones.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from exporter.model import UNKNOWN_SERVICE, ScanResult, ServiceIdentity


class EventKind(enum.StrEnum):
    PORT_NEW_OPEN = "PORT_NEW_OPEN"
    PORT_NOW_CLOSED = "PORT_NOW_CLOSED"
    PORT_SERVICE_CHANGED = "PORT_SERVICE_CHANGED"
    # Host-level bookkeeping, kept in the event log so that the history explains itself.
    BASELINE_LEARNED = "BASELINE_LEARNED"
    BASELINE_ACCEPTED = "BASELINE_ACCEPTED"


CHANGE_KINDS = frozenset(
    {EventKind.PORT_NEW_OPEN, EventKind.PORT_NOW_CLOSED, EventKind.PORT_SERVICE_CHANGED}
)


class Severity(enum.StrEnum):
    """The product's words for how bad a change is. APIs carry the value ("high"); people
    read the word ("High"), which the shipped alerts print beside their routing label
    ("Severity: High (critical)")."""

    HIGH = "high"
    MEDIUM = "medium"
    INFO = "info"

    @property
    def word(self) -> str:
        return self.value.capitalize()


SEVERITY: Mapping[EventKind, Severity] = {
    EventKind.PORT_NEW_OPEN: Severity.HIGH,
    EventKind.PORT_NOW_CLOSED: Severity.MEDIUM,
    EventKind.PORT_SERVICE_CHANGED: Severity.MEDIUM,
    EventKind.BASELINE_LEARNED: Severity.INFO,
    EventKind.BASELINE_ACCEPTED: Severity.INFO,
}


class BaselineSource(enum.StrEnum):
    EXPECTED = "expected"  # the config's expected-open list
    LEARNED = "learned"  # the first successful scan, moved by `accept`


class ScanOutcome(enum.StrEnum):
    """The `result` label of a finished scan."""

    SUCCESS = "success"
    UNREACHABLE = "unreachable"  # ran, but the host answered nothing at all
    ERROR = "error"  # could not run (resolution failed, no usable address, ...)


def scan_outcome(scan: ScanResult) -> ScanOutcome:
    if scan.error is not None:
        return ScanOutcome.ERROR
    return ScanOutcome.SUCCESS if scan.answered else ScanOutcome.UNREACHABLE


# The `change` label of a pending return to the baseline.
RETURN_TO_BASELINE = "RETURN_TO_BASELINE"


def is_identified(identity: ServiceIdentity) -> bool:
    """False when identification found nothing (timed out, unrecognised): no vote on services."""
    return identity.service != UNKNOWN_SERVICE.service


@dataclass(frozen=True, slots=True)
class Target:
    """Where the evidence of a scan points for one port, relative to the baseline.

    `kind` None means "as in the baseline". `service` is set for PORT_SERVICE_CHANGED only: two
    scans agree on a service change only when they saw the same new service.
    """

    kind: EventKind | None
    service: str | None = None

    @property
    def label(self) -> str:
        return RETURN_TO_BASELINE if self.kind is None else self.kind.value


MATCH = Target(None)


@dataclass(frozen=True, slots=True)
class Pending:
    """A change seen on `count` consecutive scans, not yet confirmed."""

    target: Target
    count: int
    first_seen: float
    last_seen: float
    observed: ServiceIdentity | None  # what the latest sighting saw; None: not open


@dataclass(frozen=True, slots=True)
class ChangeInForce:
    """A confirmed change that is neither resolved nor accepted: the gauge that alerts is 1."""

    kind: EventKind
    since: float
    old: str | None  # the baseline's fingerprint (None: not in the baseline, or not known)
    new: str | None  # the confirmed fingerprint now (None: closed)

    @property
    def target(self) -> Target:
        if self.kind is EventKind.PORT_SERVICE_CHANGED:
            return Target(self.kind, self.new)
        return Target(self.kind)


@dataclass(frozen=True, slots=True)
class LastScan:
    started: float
    finished: float
    duration_seconds: float
    outcome: ScanOutcome
    ports_scanned: int
    open_ports: int  # open in this scan (not the confirmed count)
    address: str | None
    error: str | None

    @property
    def success(self) -> bool:
        return self.outcome is ScanOutcome.SUCCESS


@dataclass(frozen=True, slots=True)
class HostState:
    """Everything known about one host. `HostState.initial(host)` before its first scan.

    - `baseline`: port -> reference fingerprint; None while no identity has been seen there.
    - `confirmed`: the confirmed open ports and who answers on them.
    - `pending`: per port, the change seen but not yet confirmed.
    - `in_force`: per port, the confirmed change against the baseline. Always equal to
      `derive_changes(baseline, confirmed)` (kinds, old and new); `since` is extra.
    - `last_change`: when the confirmed state of a port last changed (ports that matter only).
    """

    host: str
    baseline_source: BaselineSource | None = None
    baseline: Mapping[int, str | None] = field(default_factory=dict)
    confirmed: Mapping[int, ServiceIdentity] = field(default_factory=dict)
    pending: Mapping[int, Pending] = field(default_factory=dict)
    in_force: Mapping[int, ChangeInForce] = field(default_factory=dict)
    last_change: Mapping[int, float] = field(default_factory=dict)
    last_scan: LastScan | None = None

    @classmethod
    def initial(cls, host: str) -> HostState:
        return cls(host=host)


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the event log. `resolved` marks the confirmed return to the baseline."""

    at: float
    host: str
    port: int | None  # None for host-wide bookkeeping events
    kind: EventKind
    severity: Severity
    old_service: str | None
    new_service: str | None
    resolved: bool = False


@dataclass(frozen=True, slots=True)
class Transition:
    """What `step`, `accept` or `reconfigure` produced.

    `previous` is the state the transition started from: the store refuses a transition whose
    `previous` is not what it holds (someone else, e.g. `baseline accept` from the CLI, wrote
    in between). `scanned` is the port set the scan covered (empty when no scan was involved).
    `needs_confirmation` asks the scheduler to bring the next scan of the host forward.
    """

    previous: HostState
    new_state: HostState
    events: tuple[Event, ...] = ()
    needs_confirmation: bool = False
    scanned: Container[int] = frozenset()


class PortMaps(Protocol):
    """What HostState and the state machine's working copy of it have in common."""

    @property
    def baseline(self) -> Mapping[int, str | None]: ...
    @property
    def confirmed(self) -> Mapping[int, ServiceIdentity]: ...
    @property
    def pending(self) -> Mapping[int, Pending]: ...
    @property
    def in_force(self) -> Mapping[int, ChangeInForce]: ...


def ports_that_matter(state: PortMaps) -> tuple[int, ...]:
    """Ports that get per-port series: open now, in the baseline, pending, or changed."""
    ports = set(state.baseline) | set(state.confirmed) | set(state.pending) | set(state.in_force)
    return tuple(sorted(ports))
