"""Time as the daemon sees it: the wall clock, and waiting until a moment or a wake-up.

Both go through one object so that tests can run the daemon on a clock they move by hand:
with `SystemClock` a wait is `asyncio.wait_for` on the wake-up event; a test clock returns
when the test has moved its time past the deadline, so "an hour later" takes no time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch (they are written to the store and /metrics)."""

    async def wait(self, wake: asyncio.Event, deadline: float) -> None:
        """Return when `wake` is set or this clock reaches `deadline` (seconds, as `now`)."""


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def wait(self, wake: asyncio.Event, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=max(0.0, deadline - self.now()))
