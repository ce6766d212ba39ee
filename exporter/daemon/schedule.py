"""When each host is scanned next. Pure arithmetic on times given to it.

- The first scan of a host never scanned comes soon after start, spread over a few seconds
  so a thousand targets do not start in the same instant.
- A host whose last scan is older than its interval (the daemon was down) is scanned once,
  soon, not once per missed interval.
- After a scan, the next one is `interval` later, moved by a random jitter so hosts that
  started together drift apart; a scan that saw an unconfirmed change asks for the
  confirming scan `confirm_after` later instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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

    def first_due(self, spec: HostSpec, last_finished: float | None, now: float) -> float:
        """Due time at start (or when a reload adds the host)."""
        spread = min(FIRST_SCAN_SPREAD_SECONDS, self.jitter_span(spec) or 0.0)
        soon = now + self.rng.uniform(0.0, spread)
        if last_finished is None:
            return soon
        return max(soon, last_finished + spec.interval)

    def next_due(self, spec: HostSpec, finished: float, *, confirming: bool) -> float:
        if confirming:
            return finished + spec.confirm_after
        half = self.jitter_span(spec) / 2
        return finished + spec.interval + self.rng.uniform(-half, half)
