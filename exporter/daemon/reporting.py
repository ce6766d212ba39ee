"""What a finished scan tells the operator: counters for /metrics and lines for the log.

Kept apart from the runner so that recording a scan is only "step, store, publish".
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from exporter.config import HostSpec
from exporter.model import HostScan, describe_fingerprint
from exporter.state import Transition, scan_outcome

log = structlog.get_logger("portscan_exporter")


class ScanReport:
    """Counters since start, as Prometheus counters are, and the log of each scan."""

    def __init__(self) -> None:
        self._scans_total: dict[tuple[str, str], int] = {}
        self._probes_total: dict[str, int] = {}

    @property
    def scans_total(self) -> Mapping[tuple[str, str], int]:
        """(host, result) -> scans finished."""
        return self._scans_total

    @property
    def probes_total(self) -> Mapping[str, int]:
        return self._probes_total

    def keep_only(self, hosts: set[str]) -> None:
        """Drop the counters of hosts no longer configured: they are no longer exported."""
        self._scans_total = {key: n for key, n in self._scans_total.items() if key[0] in hosts}
        self._probes_total = {host: n for host, n in self._probes_total.items() if host in hosts}

    def scan_finished(self, spec: HostSpec, host_scan: HostScan, transition: Transition) -> None:
        result = host_scan.scan
        outcome = scan_outcome(result).value
        key = (spec.host, outcome)
        self._scans_total[key] = self._scans_total.get(key, 0) + 1
        self._probes_total[spec.host] = self._probes_total.get(spec.host, 0) + result.probes_sent
        for event in transition.events:
            if event.port is None:  # host-wide bookkeeping: baseline learned or accepted
                log.info(event.kind.value.lower().replace("_", " "), host=event.host)
                continue
            log.warning(
                "change resolved" if event.resolved else "change confirmed",
                host=event.host,
                port=event.port,
                change=event.kind.value,
                severity=event.severity.value,
                old_service=describe_fingerprint(event.old_service),
                new_service=describe_fingerprint(event.new_service),
            )
        log.info(
            "scan finished",
            host=spec.host,
            address=result.address,
            result=outcome,
            error=result.error,
            duration_seconds=round(result.duration_seconds, 3),
            ports_scanned=result.ports_scanned,
            open=len(result.open),
            pending=len(transition.new_state.pending),
            confirming=transition.needs_confirmation,
        )

    def scan_failed(self, spec: HostSpec) -> None:
        log.exception("scan failed", host=spec.host)
