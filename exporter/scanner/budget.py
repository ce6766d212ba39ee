"""A global cap on probes in flight, shared fairly between the hosts being scanned.

Each host scan also has its own concurrency; this budget bounds the sum across hosts (file
descriptors, conntrack entries, the network). A slot freed while hosts are waiting is not put
back in the pool but handed to the longest-waiting host, one slot at a time, so a host with
65,535 ports to go cannot starve a host that started later with 100.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class ProbeBudget:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("probe budget must be at least 1")
        self.limit = limit
        self.in_use = 0
        # Callbacks told "you now hold one more slot"; each returns whether it still wants
        # more. They must not launch probes inline (that could re-enter release()); they
        # schedule their own launching instead.
        self._waiters: deque[Callable[[], bool]] = deque()

    def try_acquire(self) -> bool:
        # No barging: while anyone waits, new slots go to the waiters in turn.
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return True
        return False

    def wait(self, grant: Callable[[], bool]) -> None:
        if grant not in self._waiters:
            self._waiters.append(grant)

    def cancel(self, grant: Callable[[], bool]) -> None:
        while grant in self._waiters:
            self._waiters.remove(grant)

    def release(self) -> None:
        if not self._waiters:
            self.in_use -= 1
            return
        grant = self._waiters.popleft()
        # A waiter that still wants more goes to the back of the line: one slot per turn.
        # It stays in line between turns, so a host whose probes finish fast keeps its
        # share instead of losing every freed slot to a host that never stops asking.
        if grant():
            self._waiters.append(grant)
