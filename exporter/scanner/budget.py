"""The global window: probes in flight across every host being scanned (`scan.max_probes`).

Each host scan has its own limits (its concurrency, its rate, its Little's-law window); this
budget bounds their sum, because file descriptors, ephemeral ports, conntrack entries and the
network are shared by all of them. It decides nothing about sockets: the probe engine asks it
to hand out whatever slots are free at the end of each round of completions, and the budget
asks the hosts that wait for slots to launch probes, in turn.

Fairness. Slots are not handed out first come, first served: a host whose probes go
unanswered holds each slot for a whole timeout, and if it took every slot that came free it
would end up holding (nearly) the whole window while a host that answers at once, and so
returns its slots at once, got one slot at a time. Instead every host has a share, the window
divided by the number of hosts being scanned, and waiting hosts sit in two round-robin queues:

- hosts holding less than their share are served first, each in turn up to its share;
- only slots that none of those wants go to hosts at or above their share (in turn too), so
  a host with a small window of its own leaves its share to the others rather than idle.

A host that took a surplus keeps it only until those probes finish (one timeout at most):
from then on the slots go to hosts below their share first. The queues use lazy deletion
(each entry carries a ticket; a host that moves or leaves makes its old entries stale), so
serving is O(1) per turn however many hosts wait.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Protocol


class Claimant(Protocol):
    """One host scan, as the budget sees it."""

    @property
    def in_flight(self) -> int:
        """Probes of this host that hold a slot now."""
        ...

    def launch(self, slots: int) -> int:
        """Start at most `slots` probes; return how many now hold a slot (probes that ended
        at once, and probes this host's own limits held back, hold none)."""
        ...

    def wants(self) -> bool:
        """Whether this host could launch a probe now if it had a slot."""
        ...


class ProbeBudget:
    """`limit` slots for probes in flight, shared by the hosts that `join`."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("probe budget must be at least 1")
        self.limit = limit
        self.in_flight = 0
        self.peak_in_flight = 0  # the most slots ever held at once
        # Every host being scanned -> its ticket in a queue: > 0 waiting below its share,
        # < 0 waiting at or above it, 0 not waiting. An entry whose ticket differs is stale.
        self._members: dict[Claimant, int] = {}
        self._below: deque[tuple[int, Claimant]] = deque()
        self._above: deque[tuple[int, Claimant]] = deque()
        self._tickets = itertools.count(1)
        self.share = limit  # of the window, for each host being scanned

    def join(self, claimant: Claimant) -> None:
        # The others' share shrinks; a host found above it is moved when its turn comes.
        self._members.setdefault(claimant, 0)
        self.share = self._share()

    def _share(self) -> int:
        return max(1, self.limit // max(1, len(self._members)))

    def leave(self, claimant: Claimant) -> None:
        """Forget `claimant` (its slots are returned separately, with `release`)."""
        if self._members.pop(claimant, None) is None:
            return
        previous, share = self.share, self._share()
        self.share = share
        if share == previous:
            return
        # The others' share grew: hosts that were at their share may be below it now.
        for ticket, waiting in list(self._above):
            if self._members.get(waiting) == -ticket and waiting.in_flight < share:
                self.want(waiting)

    def want(self, claimant: Claimant) -> None:
        """Queue `claimant` for slots, unless it waits already (or is no member)."""
        ticket = self._members.get(claimant)
        if ticket is None:
            return
        below = claimant.in_flight < self.share
        # A host queued below its share stays there: its turn checks the share again.
        if ticket > 0 or (ticket < 0 and not below):
            return
        ticket = next(self._tickets)
        queue = self._below if below else self._above
        self._members[claimant] = ticket if below else -ticket
        queue.append((ticket, claimant))
        if len(queue) > 2 * len(self._members) + 64:
            self._compact(queue, 1 if below else -1)

    @property
    def free(self) -> int:
        return self.limit - self.in_flight

    def release(self, slots: int) -> None:
        self.in_flight -= slots

    def serve(self) -> None:
        """Hand the free slots to the waiting hosts, in turn, those below their share first."""
        members, below, above = self._members, self._below, self._above
        share = self.share
        fruitless = 0  # turns in a row that launched nothing: a guard, not the normal end
        while below and fruitless <= len(below) and (free := self.limit - self.in_flight) > 0:
            ticket, claimant = below.popleft()
            if members.get(claimant) != ticket:
                continue
            members[claimant] = 0
            room = share - claimant.in_flight
            if room <= 0:
                self.want(claimant)  # to the queue above its share
                continue
            launched = claimant.launch(min(room, free, max(1, free // (len(below) + 1))))
            self.in_flight += launched
            fruitless = 0 if launched else fruitless + 1
            if claimant.wants():
                self.want(claimant)
        fruitless = 0
        while (
            above
            and not below
            and fruitless <= len(above)
            and (free := self.limit - self.in_flight) > 0
        ):
            ticket, claimant = above.popleft()
            if members.get(claimant) != -ticket:
                continue
            members[claimant] = 0
            launched = claimant.launch(min(free, max(1, free // (len(above) + 1))))
            self.in_flight += launched
            fruitless = 0 if launched else fruitless + 1
            if claimant.wants():
                self.want(claimant)
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def _compact(self, queue: deque[tuple[int, Claimant]], sign: int) -> None:
        # Stale entries pile up while hosts move between the queues; dropping them once they
        # outnumber the live ones keeps both queues O(hosts) at O(1) amortized cost per turn.
        live = [(t, c) for t, c in queue if self._members.get(c) == sign * t]
        queue.clear()
        queue.extend(live)
