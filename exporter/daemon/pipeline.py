"""The scan step: from a host's spec to a `HostScan` (TCP scan, then identification).

The daemon is handed this step as a function (`ScanFn`), the way blackbox_exporter's
prober is handed a `ProbeFn`: it never calls the scanner or the fingerprint engine itself,
so its scheduling, confirmations and storage can be tested in-process with a fake step.

A step is built from the config (`build_scan_pipeline`) at start and on every reload. Building
reads the signature files, so it may fail, and then the reload fails and the running step
stays. What all hosts' scans share lives in the step: one probe engine (one epoll set, one
deadline timer and one global window of probes in flight, `scan.max_probes`, since the
open-file limit holds for the whole process; see exporter.scanner.engine) and one limit on
ports being identified at once. A rebuilt step keeps them while their limits are unchanged,
so scans in flight and new ones draw on the same window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from exporter.config import Config, HostSpec
from exporter.fingerprint import Fingerprinter, FingerprintOptions
from exporter.model import HostScan, ServiceIdentity
from exporter.scanner import ProbeEngine, ScanOptions, raise_fd_limit, scan_host
from exporter.scanner.limits import HTTP_CONNECTIONS, HTTP_REFUSALS, RESERVED_DESCRIPTORS

log = structlog.get_logger("portscan_exporter")

ScanFn = Callable[[HostSpec], Awaitable[HostScan]]
# A probe engine left without scans keeps its epoll set and spare sockets this long: the
# next host of a round (after another's identification, say) finds them ready.
ENGINE_LINGER_SECONDS = 5.0
# (new config, the running step or None) -> the step for the new config. Blocking: it may
# read files, so the daemon calls it in a thread. Raises OSError or ValueError on bad input.
BuildScan = Callable[[Config, ScanFn | None], ScanFn]


class ScanPipeline:
    def __init__(
        self,
        engine: ProbeEngine,
        fingerprinter: Fingerprinter | None,
        identify_limit: asyncio.Semaphore,
        identify_concurrency: int,
    ) -> None:
        self.engine = engine  # every host's probes, under one global window
        self.fingerprinter = fingerprinter  # None: identification is off
        # One limit on ports being identified, across all hosts scanned at once.
        self.identify_limit = identify_limit
        self.identify_concurrency = identify_concurrency

    async def __call__(self, spec: HostSpec) -> HostScan:
        options = ScanOptions(
            timeout=spec.timeout, retries=spec.retries, concurrency=spec.concurrency, rate=spec.rate
        )
        result = await scan_host(spec.host, spec.ports, options, engine=self.engine)
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
    limit = _probe_limit(config)
    if previous and previous.engine.max_probes == limit:
        engine = previous.engine
    else:
        engine = ProbeEngine(limit, linger=ENGINE_LINGER_SECONDS)
    if previous and previous.identify_concurrency == fp.concurrency:
        identify_limit = previous.identify_limit
    else:
        identify_limit = asyncio.Semaphore(fp.concurrency)
    return ScanPipeline(engine, fingerprinter, identify_limit, fp.concurrency)


def _probe_limit(config: Config) -> int:
    # Probes get what the open-file limit leaves once the HTTP server's connection cap, the
    # identification connections and the descriptors for SQLite, logs and signature files
    # are set aside (see exporter.scanner.limits): probes + the rest <= RLIMIT_NOFILE.
    identifying = config.fingerprint.concurrency if config.fingerprint.enabled else 0
    reserved = RESERVED_DESCRIPTORS + HTTP_CONNECTIONS + HTTP_REFUSALS + identifying
    allowed = raise_fd_limit(config.scan.max_probes, reserved=reserved)
    if allowed < config.scan.max_probes:
        log.warning(
            "open-file limit too low for scan.max_probes, lowering it",
            max_probes=config.scan.max_probes,
            allowed=allowed,
        )
    return allowed
