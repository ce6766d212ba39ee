"""The per-host state machine: baseline + pending + one scan -> new state + events.

Theory of operation
===================

Nothing here does I/O or reads a clock: a scan carries its own times, and the result is a value
the caller persists and publishes. Three entry points return a `Transition`:

- `step(state, scan, ...)` for every finished scan,
- `accept(state, port, at=...)` when an operator says the current state is the new normal,
- `reconfigure(state, expected_open, at=...)` when the expected-open list of the config changed
  (`step` applies it too, so calling it at reload time is only needed to publish it early).

The baseline
------------
With an expected-open list, the list *is* the baseline. Until scans say otherwise the host is
assumed to look like it, so the first scan that lacks an expected port starts a pending
PORT_NOW_CLOSED rather than confirming one. Without a list, the first successful scan is the
baseline (event BASELINE_LEARNED) and `accept` moves it.

Each baseline port carries the fingerprint of the service that answered there, or None while
none has been identified (an expected port not yet seen, a port whose identification timed out
when the baseline was learned). The first identity confirmed on such a port becomes its
reference, silently.

Per port, per scan
------------------
A port is looked at only if this scan probed it (it is open, or in the port set that was
scanned): a port dropped from the port set is not "closed", and a change pending on it is
dropped (it can no longer be seen on consecutive scans). Closed and filtered both mean
"not open". What the scan saw is first classified against the baseline (`_VERDICTS`):

  in baseline?  seen                  verdict
  no            not open              as baseline
  no            open                  PORT_NEW_OPEN
  yes           not open              PORT_NOW_CLOSED
  yes           open, same service    as baseline  (or no reference yet)
  yes           open, other service   PORT_SERVICE_CHANGED (to that service)
  yes           open, unidentified    any open verdict (see below)

The verdict is then compared with the change in force on the port (none = as baseline) and
with the pending change (`_COUNTING`): agreeing with what is in force clears the pending change;
agreeing with the pending change advances its count; anything else starts a new pending change
with count 1. When the count reaches `confirmations` the change is confirmed: the confirmed
state moves and an event is emitted, named by `_CONFIRMED` from (change in force, verdict).
A return to the baseline is confirmed the same way and emits the resolved event of the change
it ends. A confirmed change replaces the one in force on the port (a changed service that then
closes is PORT_NOW_CLOSED, with the changed service as its old service).

Unidentified services
---------------------
An open port whose identification found nothing (service "unknown": a probe timed out, an
unrecognised protocol) says the port is open and nothing about the service. While the port is
confirmed open such a scan clears a pending close and leaves any other pending change (a
service change, a service coming back) exactly as it was: it neither advances nor resets it.
While the port is confirmed closed it counts as the port coming back as in the baseline, unless
a service change is pending, which it leaves alone. So a service identified as X on one scan and
"unknown" on the next never flaps: only two known identities that differ make a
PORT_SERVICE_CHANGED, and the confirmed identity shown is the last known one.

Unreachable hosts and failed scans
----------------------------------
A scan that got no answer at all, or could not run, produces no port events and leaves every
pending count as it was: only `last_scan` changes. The next successful scan continues the count.

Invariant
---------
`state.in_force` always equals `derive_changes(state.baseline, state.confirmed)`: the alerting
gauges are a function of the baseline and the confirmed state, never of a single scan.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Container, Mapping
from dataclasses import dataclass, field, replace

from exporter.model import UNKNOWN_SERVICE, HostScan, ServiceIdentity

from .errors import AcceptRefused, InternalStateError, InvalidInput
from .values import (
    MATCH,
    SEVERITY,
    BaselineSource,
    ChangeInForce,
    Event,
    EventKind,
    HostState,
    LastScan,
    Pending,
    ScanOutcome,
    Target,
    Transition,
    is_identified,
    ports_that_matter,
    scan_outcome,
)

_NEW_OPEN = EventKind.PORT_NEW_OPEN
_NOW_CLOSED = EventKind.PORT_NOW_CLOSED
_SERVICE_CHANGED = EventKind.PORT_SERVICE_CHANGED


class _Seen(enum.Enum):
    NOT_OPEN = enum.auto()
    SAME_SERVICE = enum.auto()  # or the baseline has no reference for the port yet
    OTHER_SERVICE = enum.auto()
    UNIDENTIFIED = enum.auto()


class _Verdict(enum.Enum):
    AS_BASELINE = enum.auto()
    NEW_OPEN = enum.auto()
    NOW_CLOSED = enum.auto()
    SERVICE_CHANGED = enum.auto()
    ANY_OPEN = enum.auto()


# (port in baseline, what the scan saw) -> verdict
_VERDICTS: Mapping[tuple[bool, _Seen], _Verdict] = {
    (False, _Seen.NOT_OPEN): _Verdict.AS_BASELINE,
    (False, _Seen.SAME_SERVICE): _Verdict.NEW_OPEN,
    (False, _Seen.OTHER_SERVICE): _Verdict.NEW_OPEN,
    (False, _Seen.UNIDENTIFIED): _Verdict.NEW_OPEN,
    (True, _Seen.NOT_OPEN): _Verdict.NOW_CLOSED,
    (True, _Seen.SAME_SERVICE): _Verdict.AS_BASELINE,
    (True, _Seen.OTHER_SERVICE): _Verdict.SERVICE_CHANGED,
    (True, _Seen.UNIDENTIFIED): _Verdict.ANY_OPEN,
}


class _Count(enum.Enum):
    SETTLE = enum.auto()  # the scan agrees with the confirmed state: drop the pending change
    ADVANCE = enum.auto()  # the scan agrees with the pending change: one more sighting
    START = enum.auto()  # a change not seen on the previous scan: first sighting


# (verdict == change in force, verdict == pending change) -> what happens to the count.
# Both true cannot happen: a pending change always differs from the change in force.
_COUNTING: Mapping[tuple[bool, bool], _Count] = {
    (True, False): _Count.SETTLE,
    (False, True): _Count.ADVANCE,
    (False, False): _Count.START,
}

# (kind of the change in force, kind of the confirmed verdict) -> (event kind, resolved).
# None is "as in the baseline". Missing pairs are impossible: a port is in the baseline or
# not, so PORT_NEW_OPEN never meets PORT_NOW_CLOSED or PORT_SERVICE_CHANGED on one port.
_CONFIRMED: Mapping[tuple[EventKind | None, EventKind | None], tuple[EventKind, bool]] = {
    (None, _NEW_OPEN): (_NEW_OPEN, False),
    (None, _NOW_CLOSED): (_NOW_CLOSED, False),
    (None, _SERVICE_CHANGED): (_SERVICE_CHANGED, False),
    (_NEW_OPEN, None): (_NEW_OPEN, True),
    (_NOW_CLOSED, None): (_NOW_CLOSED, True),
    (_SERVICE_CHANGED, None): (_SERVICE_CHANGED, True),
    (_NOW_CLOSED, _SERVICE_CHANGED): (_SERVICE_CHANGED, False),  # came back, another service
    (_SERVICE_CHANGED, _NOW_CLOSED): (_NOW_CLOSED, False),
    (_SERVICE_CHANGED, _SERVICE_CHANGED): (_SERVICE_CHANGED, False),  # changed again
    # Only when the baseline itself moves (`reconfigure`): a changed port leaves the list.
    (_SERVICE_CHANGED, _NEW_OPEN): (_NEW_OPEN, False),
}


class _HostAction(enum.Enum):
    LEARN = enum.auto()
    COMPARE = enum.auto()
    RECORD_ONLY = enum.auto()


# (scan outcome, host has a baseline) -> what the scan does to the host
_HOST_ACTIONS: Mapping[tuple[ScanOutcome, bool], _HostAction] = {
    (ScanOutcome.SUCCESS, False): _HostAction.LEARN,
    (ScanOutcome.SUCCESS, True): _HostAction.COMPARE,
    (ScanOutcome.UNREACHABLE, False): _HostAction.RECORD_ONLY,
    (ScanOutcome.UNREACHABLE, True): _HostAction.RECORD_ONLY,
    (ScanOutcome.ERROR, False): _HostAction.RECORD_ONLY,
    (ScanOutcome.ERROR, True): _HostAction.RECORD_ONLY,
}


def fingerprint_of(identity: ServiceIdentity | None) -> str | None:
    return None if identity is None else identity.fingerprint


def derive_changes(
    baseline: Mapping[int, str | None], confirmed: Mapping[int, ServiceIdentity]
) -> dict[int, tuple[EventKind, str | None, str | None]]:
    """The changes a confirmed state shows against a baseline: port -> (kind, old, new)."""
    changes: dict[int, tuple[EventKind, str | None, str | None]] = {}
    for port in sorted(set(baseline) | set(confirmed)):
        identity = confirmed.get(port)
        if port not in baseline:
            changes[port] = (_NEW_OPEN, None, fingerprint_of(identity))
        elif identity is None:
            changes[port] = (_NOW_CLOSED, baseline[port], None)
        else:
            reference = baseline[port]
            if (
                reference is not None
                and is_identified(identity)
                and identity.fingerprint != reference
            ):
                changes[port] = (_SERVICE_CHANGED, reference, identity.fingerprint)
    return changes


@dataclass
class _Draft:
    """A mutable copy of a HostState while one transition is computed."""

    host: str
    baseline_source: BaselineSource | None
    baseline: dict[int, str | None]
    confirmed: dict[int, ServiceIdentity]
    pending: dict[int, Pending]
    in_force: dict[int, ChangeInForce]
    last_change: dict[int, float]
    last_scan: LastScan | None
    events: list[Event] = field(default_factory=list)

    @classmethod
    def of(cls, state: HostState) -> _Draft:
        return cls(
            host=state.host,
            baseline_source=state.baseline_source,
            baseline=dict(state.baseline),
            confirmed=dict(state.confirmed),
            pending=dict(state.pending),
            in_force=dict(state.in_force),
            last_change=dict(state.last_change),
            last_scan=state.last_scan,
        )

    def freeze(self) -> HostState:
        matter = set(ports_that_matter(self))
        return HostState(
            host=self.host,
            baseline_source=self.baseline_source,
            baseline=dict(sorted(self.baseline.items())),
            confirmed=dict(sorted(self.confirmed.items())),
            pending=dict(sorted(self.pending.items())),
            in_force=dict(sorted(self.in_force.items())),
            # A port that stopped mattering has no series left to carry the timestamp.
            last_change={p: t for p, t in sorted(self.last_change.items()) if p in matter},
            last_scan=self.last_scan,
        )

    def emit(
        self,
        at: float,
        port: int | None,
        kind: EventKind,
        old: str | None,
        new: str | None,
        *,
        resolved: bool = False,
    ) -> None:
        self.events.append(Event(at, self.host, port, kind, SEVERITY[kind], old, new, resolved))

    def in_force_target(self, port: int) -> Target:
        change = self.in_force.get(port)
        return MATCH if change is None else change.target

    def means_open(self, port: int, target: Target) -> bool:
        if port in self.baseline:
            return target.kind is not _NOW_CLOSED
        return target.kind is _NEW_OPEN

    def set_confirmed(self, port: int, identity: ServiceIdentity | None) -> None:
        if identity is None:
            self.confirmed.pop(port, None)
            return
        self.confirmed[port] = identity
        if port in self.baseline and self.baseline[port] is None and is_identified(identity):
            self.baseline[port] = identity.fingerprint

    def sync_in_force(self, port: int, at: float) -> ChangeInForce | None:
        """Recompute the change in force on `port`; return the one it replaced."""
        before = self.in_force.pop(port, None)
        change = derive_changes(
            {port: self.baseline[port]} if port in self.baseline else {},
            {port: self.confirmed[port]} if port in self.confirmed else {},
        ).get(port)
        if change is not None:
            kind, old, new = change
            change_now = ChangeInForce(kind, at, old, new)
            if before is not None and before.target == change_now.target:
                change_now = replace(change_now, since=before.since)
            self.in_force[port] = change_now
        return before

    def confirm(self, port: int, target: Target, seen: ServiceIdentity | None, at: float) -> None:
        old = fingerprint_of(self.confirmed.get(port))
        self.set_confirmed(port, seen if self.means_open(port, target) else None)
        before = self.sync_in_force(port, at)
        after = self.in_force.get(port)
        key = (None if before is None else before.kind, None if after is None else after.kind)
        if key not in _CONFIRMED or self.in_force_target(port) != target:
            raise InternalStateError(f"{self.host}:{port}: cannot confirm {target} from {key}")
        kind, resolved = _CONFIRMED[key]
        self.last_change[port] = at
        self.emit(at, port, kind, old, fingerprint_of(self.confirmed.get(port)), resolved=resolved)

    def rebase(self, ports: Collection[int], at: float) -> None:
        """After the baseline of `ports` moved: redo their changes in force, forget pending."""
        for port in sorted(ports):
            self.pending.pop(port, None)
            before = self.sync_in_force(port, at)
            after = self.in_force.get(port)
            key = (None if before is None else before.kind, None if after is None else after.kind)
            if key[0] is key[1]:
                continue
            if key not in _CONFIRMED:
                raise InternalStateError(f"{self.host}:{port}: cannot rebase from {key}")
            kind, resolved = _CONFIRMED[key]
            self.last_change[port] = at
            current = fingerprint_of(self.confirmed.get(port))
            self.emit(at, port, kind, self.baseline.get(port), current, resolved=resolved)


def _check_ports(ports: Collection[int] | None, what: str) -> None:
    if ports is not None and any(not 1 <= p <= 65535 for p in ports):
        raise InvalidInput(f"{what}: ports must be within 1-65535")


def reconfigure(
    state: HostState, expected_open: Collection[int] | None, *, at: float
) -> Transition:
    """Apply the config's expected-open list (None: learn the baseline) to a host.

    - No list, host was expected-mode: the baseline stays and becomes a learned one (nothing
      is forgotten; `accept` can move it from now on).
    - A list on a host without baseline: the list is the baseline, the host is assumed to match.
    - A list that differs from the baseline (learned, or an older list): the list becomes the
      baseline, references of ports kept are kept, and the changes in force are recomputed at
      once from the confirmed state, which scans already confirmed. Pending changes of the ports
      that moved are dropped: they were measured against the old baseline.
    """
    _check_ports(expected_open, "expected_open")
    draft = _Draft.of(state)
    if expected_open is None:
        if state.baseline_source is BaselineSource.EXPECTED:
            draft.baseline_source = BaselineSource.LEARNED
    else:
        wanted = set(expected_open)
        if state.baseline_source is None:
            draft.baseline_source = BaselineSource.EXPECTED
            draft.baseline = dict.fromkeys(sorted(wanted))
            draft.confirmed = dict.fromkeys(sorted(wanted), UNKNOWN_SERVICE)
        elif state.baseline_source is not BaselineSource.EXPECTED or set(state.baseline) != wanted:
            draft.baseline_source = BaselineSource.EXPECTED
            moved = wanted ^ set(state.baseline)
            draft.baseline = {p: state.baseline.get(p) for p in sorted(wanted)}
            for port in moved & wanted:
                identity = draft.confirmed.get(port)
                if identity is not None and is_identified(identity):
                    draft.baseline[port] = identity.fingerprint
            draft.rebase(moved, at)
    new_state = draft.freeze()
    return Transition(state, new_state, tuple(draft.events))


def step(
    state: HostState,
    scan: HostScan,
    *,
    expected_open: Collection[int] | None,
    scanned_ports: Collection[int],
    confirmations: int = 2,
) -> Transition:
    """Fold one finished scan into a host's state. See the module docstring for the rules.

    `scanned_ports` is the port set the scan was asked to probe; ports outside it (and outside
    the scan's open ports) are left as they were. Event times are the end of the scan.
    """
    if scan.host != state.host:
        raise InvalidInput(f"scan of {scan.host!r} given to the state of {state.host!r}")
    if confirmations < 1:
        raise InvalidInput(f"confirmations must be >= 1, not {confirmations}")
    result = scan.scan
    at = result.started + result.duration_seconds
    scope: Container[int] = (
        scanned_ports
        if isinstance(scanned_ports, set | frozenset | range)
        else frozenset(scanned_ports)
    )
    configured = reconfigure(state, expected_open, at=at)
    draft = _Draft.of(configured.new_state)
    draft.events.extend(configured.events)
    outcome = scan_outcome(result)
    draft.last_scan = LastScan(
        started=result.started,
        finished=at,
        duration_seconds=result.duration_seconds,
        outcome=outcome,
        ports_scanned=result.ports_scanned,
        open_ports=len(result.open),
        address=result.address,
        error=result.error,
    )
    action = _HOST_ACTIONS[(outcome, draft.baseline_source is not None)]
    if action is _HostAction.LEARN:
        _learn(draft, scan, at)
    elif action is _HostAction.COMPARE:
        _compare(draft, scan, scope, confirmations, at)
    new_state = draft.freeze()
    return Transition(
        previous=state,
        new_state=new_state,
        events=tuple(draft.events),
        # A failed scan does not hurry the next one: that would hammer a dead host.
        needs_confirmation=outcome is ScanOutcome.SUCCESS and bool(new_state.pending),
        scanned=scope,
    )


def _learn(draft: _Draft, scan: HostScan, at: float) -> None:
    draft.baseline_source = BaselineSource.LEARNED
    for port in sorted(scan.scan.open):
        identity = scan.services.get(port, UNKNOWN_SERVICE)
        draft.baseline[port] = identity.fingerprint if is_identified(identity) else None
        draft.confirmed[port] = identity
        draft.last_change[port] = at
    draft.emit(at, None, EventKind.BASELINE_LEARNED, None, None)


def _seen(identity: ServiceIdentity | None, reference: str | None) -> _Seen:
    if identity is None:
        return _Seen.NOT_OPEN
    if not is_identified(identity):
        return _Seen.UNIDENTIFIED
    if reference is None or identity.fingerprint == reference:
        return _Seen.SAME_SERVICE
    return _Seen.OTHER_SERVICE


def _target(
    draft: _Draft, port: int, verdict: _Verdict, seen: ServiceIdentity | None
) -> Target | None:
    """The target a verdict points at; None when the scan has no say on this port."""
    if verdict is _Verdict.AS_BASELINE:
        return MATCH
    if verdict is _Verdict.NEW_OPEN:
        return Target(_NEW_OPEN)
    if verdict is _Verdict.NOW_CLOSED:
        return Target(_NOW_CLOSED)
    if verdict is _Verdict.SERVICE_CHANGED:
        return Target(_SERVICE_CHANGED, fingerprint_of(seen))
    pending = draft.pending.get(port)
    current = draft.in_force_target(port)
    if draft.means_open(port, current):
        # Confirmed open: the scan agrees on that and has no say on the service.
        if pending is not None and draft.means_open(port, pending.target):
            return None
        return current
    # Confirmed closed: the port came back; only a pending service change knows better.
    if pending is not None and pending.target.kind is _SERVICE_CHANGED:
        return None
    return MATCH


def _compare(
    draft: _Draft, scan: HostScan, scope: Container[int], confirmations: int, at: float
) -> None:
    result = scan.scan
    open_now = set(result.open)
    for port in sorted(set(ports_that_matter(draft)) | open_now):
        if port not in open_now and port not in scope and result.state_of(port) is None:
            # Not probed: no say on the port, and a pending change can no longer be seen on
            # consecutive scans, so it is dropped rather than left waiting forever.
            draft.pending.pop(port, None)
            continue
        seen = scan.services.get(port, UNKNOWN_SERVICE) if port in open_now else None
        verdict = _VERDICTS[(port in draft.baseline, _seen(seen, draft.baseline.get(port)))]
        target = _target(draft, port, verdict, seen)
        if target is None:
            continue
        pending = draft.pending.get(port)
        count = _COUNTING[
            (
                target == draft.in_force_target(port),
                pending is not None and pending.target == target,
            )
        ]
        if count is _Count.SETTLE:
            draft.pending.pop(port, None)
            if seen is not None and is_identified(seen):
                draft.set_confirmed(port, seen)
                draft.sync_in_force(port, at)
            continue
        if pending is not None and count is _Count.ADVANCE:
            if seen is not None and not is_identified(seen) and pending.observed is not None:
                seen = pending.observed  # keep the last identity that said something
            pending = Pending(target, pending.count + 1, pending.first_seen, at, seen)
        else:
            pending = Pending(target, 1, at, at, seen)
        if pending.count >= confirmations:
            draft.pending.pop(port, None)
            draft.confirm(port, target, seen, at)
        else:
            draft.pending[port] = pending


def accept(state: HostState, port: int | None = None, *, at: float) -> Transition:
    """Make the confirmed state the baseline, for one port or (port None) the whole host.

    Clears the changes in force and the pending changes of those ports. Emits one
    BASELINE_ACCEPTED event per port whose baseline entry moved, or a single one when nothing
    moved (the operator's action is logged either way).
    """
    if state.baseline_source is None:
        raise AcceptRefused(f"host {state.host}: no baseline yet (no successful scan)")
    if state.baseline_source is BaselineSource.EXPECTED:
        raise AcceptRefused(
            f"host {state.host}: its baseline is the expected-open list of the config;"
            " edit the list and reload instead"
        )
    draft = _Draft.of(state)
    known = ports_that_matter(state)
    if port is not None and port not in known:
        raise AcceptRefused(f"host {state.host}: nothing known about port {port}")
    for p in known if port is None else (port,):
        identity = draft.confirmed.get(p)
        had, old = p in draft.baseline, draft.baseline.get(p)
        if identity is None:
            draft.baseline.pop(p, None)
        else:
            draft.baseline[p] = identity.fingerprint if is_identified(identity) else None
        draft.pending.pop(p, None)
        draft.in_force.pop(p, None)
        if had != (p in draft.baseline) or old != draft.baseline.get(p):
            draft.emit(at, p, EventKind.BASELINE_ACCEPTED, old, draft.baseline.get(p))
    if not draft.events:
        draft.emit(at, port, EventKind.BASELINE_ACCEPTED, None, None)
    return Transition(state, draft.freeze(), tuple(draft.events))
