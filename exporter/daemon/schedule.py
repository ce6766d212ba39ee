"""When each host is scanned next. Pure arithmetic on times given to it.

- The first scan of a host never scanned comes soon after start, spread over a few seconds
  so a thousand targets do not start in the same instant.
- A host whose last scan is older than its interval (the daemon was down) is scanned once,
  soon, not once per missed interval.
- A host with a change seen but not yet confirmed is due `confirm_after` after its last scan,
  restart or not: a deploy must not hold a confirmation (and its alert) back a whole interval.
- After a scan, the next one is `interval` later, moved by a random jitter so hosts that
  started together drift apart; a scan that saw an unconfirmed change asks for the
  confirming scan `confirm_after` later instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from exporter.config import HostSpec, ScanSettings

# The first scans of all hosts start within this many seconds of the daemon's start.
FIRST_SCAN_SPREAD_SECONDS = 10.0


@dataclass
class Planner:
    settings: ScanSettings
    rng: random.Random

    def jitter_span(self, spec: HostSpec) -> float:
        if self.settings.jitter_seconds is not None:
            span = self.settings.jitter_seconds
        else:
            span = (self.settings.jitter_fraction or 0.0) * spec.interval
        return min(span, spec.interval / 2)

    def first_due(
        self, spec: HostSpec, last_finished: float | None, now: float, *, confirming: bool = False
    ) -> float:
        """Due time at start (or when a reload adds the host). `confirming`: the stored
        state holds a change seen but not yet confirmed."""
        spread = min(FIRST_SCAN_SPREAD_SECONDS, self.jitter_span(spec) or 0.0)
        soon = now + self.rng.uniform(0.0, spread)
        if last_finished is None:
            return soon
        wait = spec.confirm_after if confirming else spec.interval
        return max(soon, last_finished + wait)

    def next_due(self, spec: HostSpec, finished: float, *, confirming: bool) -> float:
        if confirming:
            return finished + spec.confirm_after
        half = self.jitter_span(spec) / 2
        return finished + spec.interval + self.rng.uniform(-half, half)


@dataclass
class DueTimes:
    """When each host is due and which are being scanned, against a limit of scans at once.

    While a host is being scanned its due time stays the one it had: a scan that hangs shows
    as overdue (PortscanScanStale) instead of dropping the series.
    """

    max_running: int
    due: dict[str, float] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)

    def startable(self, now: float) -> list[str]:
        """Hosts to start now, the longest overdue first, as many as there are free slots."""
        free = self.max_running - len(self.running)
        if free <= 0:
            return []
        waiting = sorted(
            (due, host) for host, due in self.due.items() if due <= now and host not in self.running
        )
        return [host for _, host in waiting[:free]]

    def next_wake(self) -> float | None:
        """The next due time worth waking for: none while every slot is taken (a finishing
        scan wakes the loop), else the earliest of the hosts not being scanned."""
        if len(self.running) >= self.max_running:
            return None
        return min(
            (due for host, due in self.due.items() if host not in self.running), default=None
        )
