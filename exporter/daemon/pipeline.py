"""The scan step: from a host's spec to a `HostScan` (TCP scan, then identification).

The daemon is handed this step as a function (`ScanFn`), the way blackbox_exporter's
prober is handed a `ProbeFn`: it never calls the scanner or the fingerprint engine itself,
so its scheduling, confirmations and storage can be tested in-process with a fake step.

A step is built from the config (`build_scan_pipeline`) at start and on every reload. Building
reads the signature files, so it may fail, and then the reload fails and the running step
stays. What all hosts' scans share lives in the step: the scanner (`scan.processes` scanner
processes with a probe engine each, or one engine in the daemon's own process; together they
keep at most `scan.max_probes` probes in flight; see exporter.scanner.processes and
exporter.scanner.engine) and one limit on ports being identified at once. A rebuilt step
keeps them while their limits are unchanged, so scans in flight and new ones draw on the same
window; a scanner that a reload replaced finishes the scans it has, then closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from exporter.config import Config, HostSpec
from exporter.fingerprint import Fingerprinter, FingerprintOptions
from exporter.model import HostScan, ServiceIdentity
from exporter.scanner import ScanOptions, raise_fd_limit
from exporter.scanner.limits import HTTP_CONNECTIONS, HTTP_REFUSALS, RESERVED_DESCRIPTORS
from exporter.scanner.processes import (
    SCANNER_RESERVED_DESCRIPTORS,
    InProcessScanner,
    ScannerProcesses,
    scanner_processes,
)

log = structlog.get_logger("portscan_exporter")

ScanFn = Callable[[HostSpec], Awaitable[HostScan]]
Scanner = InProcessScanner | ScannerProcesses
# (new config, the running step or None) -> the step for the new config. Blocking: it may
# read files, so the daemon calls it in a thread. Raises OSError or ValueError on bad input.
BuildScan = Callable[[Config, ScanFn | None], ScanFn]


class ScanPipeline:
    def __init__(
        self,
        scanner: Scanner,
        fingerprinter: Fingerprinter | None,
        identify_limit: asyncio.Semaphore,
        identify_concurrency: int,
    ) -> None:
        self.scanner = scanner  # every host's probes, under one global window
        self.fingerprinter = fingerprinter  # None: identification is off
        # One limit on ports being identified, across all hosts scanned at once.
        self.identify_limit = identify_limit
        self.identify_concurrency = identify_concurrency

    async def __call__(self, spec: HostSpec) -> HostScan:
        options = ScanOptions(
            timeout=spec.timeout, retries=spec.retries, concurrency=spec.concurrency, rate=spec.rate
        )
        result = await self.scanner.scan(spec.host, spec.ports, options)
        services: dict[int, ServiceIdentity] = {}
        started = time.monotonic()
        if self.fingerprinter is not None:
            services = await self.fingerprinter.identify_scanned(
                result, limiter=self.identify_limit
            )
        return HostScan(scan=result, services=services, identify_seconds=time.monotonic() - started)


def build_scan_pipeline(config: Config, running: ScanFn | None) -> ScanPipeline:
    previous = running if isinstance(running, ScanPipeline) else None
    fp = config.fingerprint
    options = FingerprintOptions(
        timeout=fp.timeout,
        max_bytes=fp.max_bytes,
        concurrency=fp.concurrency,
        nmap_service_probes=fp.nmap_service_probes,
    )
    fingerprinter = Fingerprinter.load(options) if fp.enabled else None
    count = scanner_processes(config.scan.processes)
    limit = _probe_limit(config, count)
    scanner: Scanner
    if previous and (previous.scanner.count, previous.scanner.max_probes) == (count, limit):
        scanner = previous.scanner
    elif count == 1:
        scanner = InProcessScanner(limit)
    else:
        scanner = ScannerProcesses(count, limit)
    if previous and previous.identify_concurrency == fp.concurrency:
        identify_limit = previous.identify_limit
    else:
        identify_limit = asyncio.Semaphore(fp.concurrency)
    return ScanPipeline(scanner, fingerprinter, identify_limit, fp.concurrency)


async def retire_scan_step(old: ScanFn | None, new: ScanFn | None) -> None:
    """After a reload: close the old step's scanner once its scans are done, unless the new
    step kept it."""
    if not isinstance(old, ScanPipeline):
        return
    if not isinstance(new, ScanPipeline) or new.scanner is not old.scanner:
        await old.scanner.retire()


async def close_scan_step(step: ScanFn | None) -> None:
    """At shutdown: stop the step's scanner processes."""
    if isinstance(step, ScanPipeline):
        await step.scanner.aclose()


def _probe_limit(config: Config, processes: int) -> int:
    # In the daemon's process, probes get what the open-file limit leaves once the HTTP
    # server's connection cap, the identification connections and the descriptors for
    # SQLite, logs and signature files are set aside (see exporter.scanner.limits): probes +
    # the rest <= RLIMIT_NOFILE. Scanner processes inherit the limit raised here and each
    # needs only its part of the window and a few descriptors of its own.
    wanted = config.scan.max_probes
    identifying = config.fingerprint.concurrency if config.fingerprint.enabled else 0
    reserved = RESERVED_DESCRIPTORS + HTTP_CONNECTIONS + HTTP_REFUSALS + identifying
    if processes > 1:
        raise_fd_limit(0, reserved=reserved)  # the daemon's own descriptors
        part = -(-wanted // processes)
        allowed = processes * raise_fd_limit(part, reserved=SCANNER_RESERVED_DESCRIPTORS)
    else:
        allowed = raise_fd_limit(wanted, reserved=reserved)
    allowed = min(allowed, wanted)
    if allowed < config.scan.max_probes:
        log.warning(
            "open-file limit too low for scan.max_probes, lowering it",
            max_probes=config.scan.max_probes,
            allowed=allowed,
        )
    return allowed
