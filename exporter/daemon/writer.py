"""Finished scans go to the store in groups: one transaction for all that finished meanwhile.

A fleet finishes hundreds of scans a second, and a transaction per scan is an fsync per scan
plus a thread hand-off per scan: the store, not the network, would bound the scan rate. So
each scan hands its result to `ScanWriter.record` and waits; one write runs at a time, and
the scans that finish while it runs are written together in the next one
(`Store.record_scans`, a savepoint per scan). A lone scan is written at once, as before: the
group is whatever queued up, never a timer.

Each scan still waits for its own commit before its result is published, so a gauge never
shows what a crash could lose; and each scan's outcome is its own (a stale state refused for
one host leaves the others written).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from exporter.model import HostScan
from exporter.state import Transition
from exporter.store import Store

# Scans per transaction at most: bounds how long one write holds the store's lock.
MAX_GROUP = 512


@dataclass(eq=False)
class _Queued:
    host_scan: HostScan
    transition: Transition
    done: asyncio.Future[bool]


class ScanWriter:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[_Queued] = []
        self._writing: asyncio.Task[None] | None = None

    async def record(self, host_scan: HostScan, transition: Transition) -> bool:
        """`Store.record_scan`, grouped with the scans that finish meanwhile. Raises what it
        raises: StaleStateError for this scan alone, a store error for the whole group."""
        item = _Queued(host_scan, transition, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write_queued(), name="store writes")
        return await item.done

    async def close(self) -> None:
        """Wait for the write under way, if any; what is queued behind it is still written."""
        if self._writing is not None:
            await asyncio.shield(self._writing)

    async def _write_queued(self) -> None:
        while self._queue:
            # A scan cancelled while it waited (shutdown, host removed) is not written.
            queued = [item for item in self._queue if not item.done.done()]
            group, self._queue = queued[:MAX_GROUP], queued[MAX_GROUP:]
            if not group:
                continue
            scans = [(item.host_scan, item.transition) for item in group]
            try:
                outcomes = await asyncio.to_thread(self._store.record_scans, scans)
            except Exception as exc:  # full disk, I/O error, file replaced: nothing written
                for item in group:
                    if not item.done.done():
                        item.done.set_exception(exc)
                continue
            for item, outcome in zip(group, outcomes, strict=True):
                if item.done.done():
                    continue
                if isinstance(outcome, Exception):
                    item.done.set_exception(outcome)
                else:
                    item.done.set_result(outcome)
