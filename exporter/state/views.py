"""Read-only views of a HostState for the /metrics collector and the status page."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from exporter.model import ServiceIdentity

from .values import EventKind, HostState, ports_that_matter


class HostStatus(enum.StrEnum):
    UNKNOWN = "Unknown"  # never scanned successfully: no baseline yet
    UNREACHABLE = "Unreachable"  # the last scan failed or got no answer
    CHANGED = "Changed"  # a confirmed change is in force
    PENDING = "Pending"  # a change was seen and awaits confirmation
    STABLE = "Stable"


def host_status(state: HostState) -> HostStatus:
    """One word for a host, the most urgent first (an unreachable host hides its ports)."""
    if state.last_scan is not None and not state.last_scan.success:
        return HostStatus.UNREACHABLE
    if state.baseline_source is None or state.last_scan is None:
        return HostStatus.UNKNOWN
    if state.in_force:
        return HostStatus.CHANGED
    if state.pending:
        return HostStatus.PENDING
    return HostStatus.STABLE


@dataclass(frozen=True, slots=True)
class PortStatus:
    """The per-port gauges, ready to export."""

    port: int
    open: bool  # confirmed open
    expected: bool  # in the baseline / expected-open list
    identity: ServiceIdentity | None  # confirmed identity while open
    change: EventKind | None  # the confirmed change in force
    pending: str | None  # `change` label of the pending change (see Target.label)
    pending_count: int
    last_change: float | None

    @property
    def unexpected_open(self) -> bool:
        return self.change is EventKind.PORT_NEW_OPEN

    @property
    def expected_closed(self) -> bool:
        return self.change is EventKind.PORT_NOW_CLOSED

    @property
    def service_changed(self) -> bool:
        return self.change is EventKind.PORT_SERVICE_CHANGED


def port_status(state: HostState, port: int) -> PortStatus:
    change = state.in_force.get(port)
    pending = state.pending.get(port)
    return PortStatus(
        port=port,
        open=port in state.confirmed,
        expected=port in state.baseline,
        identity=state.confirmed.get(port),
        change=None if change is None else change.kind,
        pending=None if pending is None else pending.target.label,
        pending_count=0 if pending is None else pending.count,
        last_change=state.last_change.get(port),
    )


def port_statuses(state: HostState) -> tuple[PortStatus, ...]:
    return tuple(port_status(state, port) for port in ports_that_matter(state))
