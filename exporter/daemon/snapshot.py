"""The in-memory picture every reader (/metrics, status page, JSON API) works from.

A `Snapshot` is immutable: a reader gets one consistent picture without locks, SQL or
waiting for a scan. The daemon keeps each host's view up to date in place as scans finish
and builds a new Snapshot from those views when one is read after a change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from exporter.config import HostSpec
from exporter.daemon.reporting import StoreHealth
from exporter.state import HostState
from exporter.store import History


@dataclass(frozen=True, slots=True)
class HostView:
    spec: HostSpec
    state: HostState
    next_scan: float | None  # when it is (or, while scanning, was) due; None: not planned
    scanning: bool = False
    # Ports with series that the last successful scan got no answer from (dropped); None
    # until the first scan after a start: it is not kept in the store.
    filtered: frozenset[int] | None = None

    @property
    def host(self) -> str:
        return self.spec.host


@dataclass(frozen=True, slots=True)
class ReloadStatus:
    successful: bool
    at: float  # when the last reload attempt (or the start) happened
    last_success_at: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    hosts: tuple[HostView, ...]  # in config order
    reload: ReloadStatus
    started_at: float
    config_path: str
    ready: bool = False  # state loaded from the store and scheduling running
    vantage: str | None = None  # the `vantage` label of every series, when configured
    store: StoreHealth = field(default_factory=StoreHealth)
    # Counters since start, as Prometheus counters are: (host, result) -> scans finished.
    scans_total: Mapping[tuple[str, str], int] = field(default_factory=dict)
    probes_total: Mapping[str, int] = field(default_factory=dict)
    _index: Mapping[str, HostView] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = (view.spec.host for view in self.hosts)
        object.__setattr__(self, "_index", dict(zip(names, self.hosts, strict=True)))

    def host(self, name: str) -> HostView | None:
        return self._index.get(name)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    successful: bool
    error: str | None = None


class Control(Protocol):
    """What the HTTP surface may ask of the running daemon."""

    @property
    def snapshot(self) -> Snapshot: ...

    async def reload(self) -> ReloadResult:
        """Re-read the config file; on error keep the running config and say why."""

    async def accept(self, host: str, port: int | None) -> HostState:
        """Move a learned baseline to the confirmed state; raises AcceptRefused."""

    async def history(self, host: str, since: float, until: float | None) -> History:
        """Events, timeline intervals and scans of a host from the store."""
