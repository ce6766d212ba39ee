"""What a finished scan tells the operator: counters for /metrics and lines for the log.

Kept apart from the runner so that recording a scan is only "step, store, publish".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
            tcp_seconds=round(result.duration_seconds, 3),
            identify_seconds=round(host_scan.identify_seconds, 3),
            ports_scanned=result.ports_scanned,
            open=len(result.open),
            pending=len(transition.new_state.pending),
            confirming=transition.needs_confirmation,
        )

    def scan_failed(
        self, spec: HostSpec, error: BaseException, *, retry_in: float, store: bool
    ) -> None:
        """A scan that recorded nothing: counted as result="error", logged in one line when
        the store refused the write (the error says why), with the traceback otherwise."""
        key = (spec.host, "error")
        self._scans_total[key] = self._scans_total.get(key, 0) + 1
        if store:
            log.error(
                "store write failed, scan not recorded",
                host=spec.host,
                error=str(error) or type(error).__name__,
                retry_in_seconds=round(retry_in, 1),
            )
        else:
            log.exception("scan failed", host=spec.host, retry_in_seconds=round(retry_in, 1))


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """Whether the store takes the daemon's writes: when it does not, nothing is recorded
    and nothing can alert, so it must show (metrics, readiness, page, log)."""

    write_errors_total: int = 0
    last_write_ok: bool = True
    last_success_at: float | None = None
    last_error: str | None = None

    def succeeded(self, at: float) -> StoreHealth:
        return StoreHealth(self.write_errors_total, True, at, None)

    def failed(self, error: BaseException, *, count: bool = True) -> StoreHealth:
        """After a refused write (counted), or a problem seen without writing."""
        message = str(error) or type(error).__name__
        errors = self.write_errors_total + (1 if count else 0)
        return StoreHealth(errors, False, self.last_success_at, message)
