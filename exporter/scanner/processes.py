"""Host scans spread over scanner processes, one probe engine each.

Why processes
-------------
A probe costs a few microseconds of Python and several times that in the kernel: socket(),
connect(), epoll, close(), and on a nearby target the handshake itself, all of it charged to
the thread that made the call. One process therefore scans at the speed of one core, however
many the machine has. Threads do not lift that: the interpreter lock changes hands at every
one of those system calls, and two scanning threads were measured at 1.1x the throughput of
one, where two processes reach 1.8x (512 hosts x 1,000 refused ports on this project's lab).

So the daemon runs `scan.processes` scanner processes (by default one per CPU it may use).
Each is a small asyncio program, `python -m exporter.scanner.processes`, with a probe engine
of its own (its own epoll set, deadline timer and open-file limit) whose global window is its
part of `scan.max_probes`. A host's whole scan runs in one process, so the per-host politeness
limits (`concurrency`, `rate`) still bound what a target sees; a scan goes to the process
with the fewest hosts in flight. Identification, the state machine, the store and HTTP stay in
the daemon: a scanner process only turns (host, ports, options) into a `ScanResult`.

The protocol is length-prefixed pickles over the child's standard input and output:

    daemon -> scanner   ("scan", id, host, ports, options)  |  ("cancel", id)
    scanner -> daemon   (id, ScanResult)  |  (id, "what went wrong")

Pickle is safe here: both ends are this program and the pipe is private to them.

Lifetimes
---------
- A scanner process exits when its standard input closes: when the daemon closes it at
  shutdown, or when the daemon dies (kill -9 included), so no orphan goes on probing.
- A scanner process that dies fails the scans it had with `ScannerLost`, which the daemon
  records as a failed scan (retried later), never as closed ports; the next scan starts a new
  process in its place.
- Ctrl-C in a terminal signals the whole process group: scanner processes ignore SIGINT and
  SIGHUP and leave the decision to the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import pickle
import signal
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import cast

from exporter import eventloop
from exporter.model import ScanResult
from exporter.scanner.connect import ScanOptions, scan_host
from exporter.scanner.engine import ProbeEngine
from exporter.scanner.limits import raise_fd_limit

# Frames are a 4-byte length then a pickle; a scan request carries at most 65,535 ports.
_HEADER = struct.Struct("<I")
# A scanner process left without scans keeps its epoll set and spare sockets this long.
ENGINE_LINGER_SECONDS = 5.0
# Descriptors a scanner process needs besides its probe sockets: its pipes, epoll, Python's.
SCANNER_RESERVED_DESCRIPTORS = 32
# How long a closed scanner process gets to exit before it is killed.
EXIT_GRACE_SECONDS = 2.0
# The most scanner processes `scan.processes: 0` starts, however many CPUs there are: past a
# few, the daemon's own share of the work (identification, store, HTTP) is the bound.
MAX_AUTO_PROCESSES = 8


class ScannerLost(RuntimeError):
    """The scanner process running a scan exited before it answered."""


def usable_cpus() -> int:
    """CPUs this process may run on: its CPU affinity, bounded by a cgroup v2 CPU quota
    (a container limited to 1.5 CPUs counts 2), the way Go's automaxprocs counts them."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def scanner_processes(configured: int) -> int:
    """`scan.processes` as the daemon applies it: 0 means one per usable CPU (at most 8)."""
    return configured if configured > 0 else min(usable_cpus(), MAX_AUTO_PROCESSES)


def _frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> object:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))


class _Scanner:
    """One scanner process and the scans it was given."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pending: dict[int, asyncio.Future[ScanResult]] = {}
        self._ids = itertools.count()
        self._reading = asyncio.create_task(self._read(), name=f"scanner {process.pid}")

    @property
    def alive(self) -> bool:
        return not self._reading.done()

    async def scan(self, host: str, ports: list[int], options: ScanOptions) -> ScanResult:
        assert self.process.stdin is not None
        if not self.alive:  # it died after it was chosen: its reader has failed the rest
            raise ScannerLost(f"scanner process {self.process.pid} exited")
        scan_id = next(self._ids)
        answer: asyncio.Future[ScanResult] = asyncio.get_running_loop().create_future()
        self.pending[scan_id] = answer
        self.process.stdin.write(_frame(("scan", scan_id, host, ports, options)))
        try:
            return await answer
        except asyncio.CancelledError:
            if self.pending.pop(scan_id, None) is not None and self.alive:
                self.process.stdin.write(_frame(("cancel", scan_id)))
            raise

    async def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            while True:
                frame = await _read_frame(self.process.stdout)
                scan_id, result = cast(tuple[int, ScanResult | str], frame)
                answer = self.pending.pop(scan_id, None)
                if answer is None or answer.done():
                    continue  # cancelled meanwhile
                if isinstance(result, ScanResult):
                    answer.set_result(result)
                else:
                    answer.set_exception(RuntimeError(f"scanner process: {result}"))
        except (asyncio.IncompleteReadError, ConnectionError, pickle.UnpicklingError):
            pass
        code = await self.process.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        for answer in self.pending.values():
            if not answer.done():
                answer.set_exception(
                    ScannerLost(f"scanner process {self.process.pid} {how} during the scan")
                )
        self.pending.clear()

    async def close(self) -> None:
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._reading), EXIT_GRACE_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self._reading


class ScannerProcesses:
    """`count` scanner processes sharing `max_probes` probes in flight, started on first use.

    Made in any thread (the daemon builds its scan step in one); used from one event loop.
    """

    def __init__(self, count: int, max_probes: int) -> None:
        if count < 1:
            raise ValueError("at least one scanner process")
        self.count = count
        self.max_probes = max_probes
        self._scanners: list[_Scanner] = []
        self._starting: asyncio.Lock | None = None
        self._closed = False

    async def scan(self, host: str, ports: Iterable[int], options: ScanOptions) -> ScanResult:
        """Scan `ports` of `host` in the least busy scanner process (raises ScannerLost if
        that process dies first)."""
        if self._closed:
            raise ScannerLost("the scanner processes are shut down")
        scanner = await self._least_busy()
        return await scanner.scan(host, list(ports), options)

    async def _least_busy(self) -> _Scanner:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            self._scanners = [s for s in self._scanners if s.alive]
            while len(self._scanners) < self.count:
                self._scanners.append(await self._start())
        return min(self._scanners, key=lambda s: len(s.pending))

    async def _start(self) -> _Scanner:
        # Each process gets its part of the window; its open-file limit is its own.
        share = max(1, self.max_probes // self.count)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "exporter.scanner.processes",
            str(share),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return _Scanner(process)

    async def aclose(self) -> None:
        """Close every scanner process (their scans in flight fail with ScannerLost)."""
        self._closed = True
        scanners, self._scanners = self._scanners, []
        await asyncio.gather(*(s.close() for s in scanners))

    async def retire(self) -> None:
        """Take no more scans, let those in flight finish, then close (a reload that
        changed the number of processes or the window)."""
        self._closed = True
        pending = [answer for s in self._scanners for answer in s.pending.values()]
        await asyncio.gather(*pending, return_exceptions=True)
        await self.aclose()


class InProcessScanner:
    """Host scans in the daemon's own process: `scan.processes: 1`, or a single CPU."""

    count = 1

    def __init__(self, max_probes: int) -> None:
        self.max_probes = max_probes
        self.engine = ProbeEngine(max_probes, linger=ENGINE_LINGER_SECONDS)

    async def scan(self, host: str, ports: Iterable[int], options: ScanOptions) -> ScanResult:
        return await scan_host(host, ports, options, engine=self.engine)

    async def aclose(self) -> None:
        """Nothing to close: the engine gives its descriptors back when idle."""

    async def retire(self) -> None:
        """Nothing to wait for: scans in flight keep the engine they hold."""


# -- the scanner process ------------------------------------------------------------------


async def _serve(max_probes: int, commands: int, answers: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(commands, "rb", buffering=0)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.Protocol, os.fdopen(answers, "wb", buffering=0)
    )
    engine = ProbeEngine(max_probes, linger=ENGINE_LINGER_SECONDS)
    scans: dict[int, asyncio.Task[None]] = {}

    async def run(scan_id: int, host: str, ports: list[int], options: ScanOptions) -> None:
        answer: ScanResult | str
        try:
            answer = await scan_host(host, ports, options, engine=engine)
        except Exception as exc:  # a bug fails this scan, not the others in this process
            answer = f"{type(exc).__name__}: {exc}"
        finally:
            scans.pop(scan_id, None)
        transport.write(_frame((scan_id, answer)))

    while True:
        try:
            message = await _read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            break  # the daemon closed the pipe, or is gone
        match message:
            case ("scan", int(scan_id), str(host), list(ports), ScanOptions() as options):
                scans[scan_id] = asyncio.create_task(run(scan_id, host, ports, options))
            case ("cancel", int(scan_id)):
                task = scans.pop(scan_id, None)
                if task is not None:
                    task.cancel()
    for task in scans.values():
        task.cancel()
    await asyncio.gather(*scans.values(), return_exceptions=True)
    transport.close()
    del protocol


def main(argv: list[str]) -> None:
    for name in ("SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    max_probes = raise_fd_limit(int(argv[0]), reserved=SCANNER_RESERVED_DESCRIPTORS)
    # The answers get a descriptor of their own and standard output points at standard
    # error, so a stray print() can never corrupt a frame.
    answers = os.dup(1)
    os.dup2(2, 1)
    eventloop.run(_serve(max_probes, 0, answers))


if __name__ == "__main__":
    main(sys.argv[1:])
