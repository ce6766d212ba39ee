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

import heapq
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


class DueTimes:
    """When each host is due and which are being scanned, against a limit of scans at once.

    While a host is being scanned its due time stays the one it had: a scan that hangs shows
    as overdue (PortscanScanStale) instead of dropping the series.

    The due times sit in a heap as well, so that a decision costs O(log hosts) however large
    the fleet: an entry whose host has been given another due time since, or is being
    scanned, is stale and dropped when it reaches the top (lazy deletion).
    """

    def __init__(self, max_running: int) -> None:
        self.max_running = max_running
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self.running: set[str] = set()

    def get(self, host: str) -> float | None:
        return self._due.get(host)

    def __contains__(self, host: str) -> bool:
        return host in self._due

    def set(self, host: str, due: float) -> None:
        self._due[host] = due
        if host not in self.running:
            heapq.heappush(self._heap, (due, host))

    def replace_all(self, due: dict[str, float]) -> None:
        """A new set of hosts (start, reload): hosts not in `due` are no longer planned."""
        self._due = dict(due)
        self._heap = [(when, host) for host, when in self._due.items() if host not in self.running]
        heapq.heapify(self._heap)

    def finish(self, host: str) -> None:
        """The host's scan ended; its next due time comes from `set` (or stays as it was)."""
        self.running.discard(host)
        due = self._due.get(host)
        if due is not None:
            heapq.heappush(self._heap, (due, host))

    def start_due(self, now: float) -> list[str]:
        """Hosts to start now, the longest overdue first, as many as there are free slots;
        they count as running from here until `finish`."""
        started: list[str] = []
        while len(self.running) < self.max_running:
            due = self._top()
            if due is None or due > now:
                break
            _, host = heapq.heappop(self._heap)
            self.running.add(host)
            started.append(host)
        return started

    def next_wake(self) -> float | None:
        """The next due time worth waking for: none while every slot is taken (a finishing
        scan wakes the loop), else the earliest of the hosts not being scanned."""
        if len(self.running) >= self.max_running:
            return None
        return self._top()

    def _top(self) -> float | None:
        heap = self._heap
        while heap:
            due, host = heap[0]
            if host not in self.running and self._due.get(host) == due:
                return due
            heapq.heappop(heap)  # stale: re-planned, being scanned, or removed
        return None
