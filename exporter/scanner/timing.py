"""Round-trip-time based connect timeouts, the way nmap derives them.

A host on the same LAN answers in well under a millisecond; waiting a full configured
timeout for each of its dropped ports would make a full-range scan take minutes. So, like
nmap (RFC 6298 style), we keep a smoothed RTT and its variance from the handshakes that did
complete (SYN-ACK or RST) and wait `srtt + 4 * rttvar` for an answer, clamped between a
floor and the configured ceiling. Until the first answer the ceiling applies.

The "RTT" measured here runs from `connect()` to the moment our event loop saw the answer,
so it includes our own scheduling latency. That is deliberate: a timeout shorter than our own
latency would turn a busy loop into false "filtered" results.
"""

from __future__ import annotations

from dataclasses import dataclass

# nmap's --min-rtt-timeout default. Below this, scheduling noise (a GC pause, another host's
# burst of callbacks) is of the same order as the timeout itself.
DEFAULT_MIN_TIMEOUT = 0.1


@dataclass(slots=True)
class RttEstimator:
    ceiling: float
    floor: float = DEFAULT_MIN_TIMEOUT
    srtt: float | None = None
    rttvar: float = 0.0

    def observe(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
            return
        delta = rtt - self.srtt
        self.srtt += delta / 8
        self.rttvar += (abs(delta) - self.rttvar) / 4

    @property
    def timeout(self) -> float:
        if self.srtt is None:
            return self.ceiling
        floor = min(self.floor, self.ceiling)
        return min(self.ceiling, max(floor, self.srtt + 4 * self.rttvar))
