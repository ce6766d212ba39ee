"""The /metrics collector: every series is built per scrape from the current Snapshot.

No scan, no SQL and no lock happen at scrape time: the snapshot is an immutable value that
the daemon replaces after each scan. Per-port series exist only for the ports that matter
(open now, in the baseline, pending, or with a change in force), so a host scanned on all
65,535 ports costs a handful of series, not 65,535.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.daemon.snapshot import Snapshot
from exporter.state import RETURN_TO_BASELINE, EventKind, port_statuses

PORT_LABELS = ["host", "port", "protocol"]
PENDING_CHANGES = (
    EventKind.PORT_NEW_OPEN.value,
    EventKind.PORT_NOW_CLOSED.value,
    EventKind.PORT_SERVICE_CHANGED.value,
    RETURN_TO_BASELINE,
)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"portscan_{name}", doc, labels=labels)


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        # Families are dynamic (per host, per port); an empty describe keeps registration
        # from calling collect() before the daemon has a snapshot.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        port_open = _gauge("port_open", "Whether the port is open (confirmed state).", PORT_LABELS)
        expected = _gauge(
            "port_expected",
            "Whether the port is in the baseline or expected-open list.",
            PORT_LABELS,
        )
        unexpected_open = _gauge(
            "port_unexpected_open",
            "A confirmed PORT_NEW_OPEN is in force: open and not in the baseline.",
            PORT_LABELS,
        )
        expected_closed = _gauge(
            "port_expected_closed",
            "A confirmed PORT_NOW_CLOSED is in force: in the baseline and not open.",
            PORT_LABELS,
        )
        service_changed = _gauge(
            "port_service_changed",
            "A confirmed PORT_SERVICE_CHANGED is in force: another service than the baseline's.",
            PORT_LABELS,
        )
        pending = _gauge(
            "port_change_pending",
            "A change seen on the last scan(s) but not yet confirmed, by kind of change.",
            [*PORT_LABELS, "change"],
        )
        service_info = _gauge(
            "port_service_info",
            "The service identified on an open port.",
            [*PORT_LABELS, "service", "product", "version"],
        )
        cert_expiry = _gauge(
            "port_tls_cert_expiry_timestamp_seconds",
            "notAfter of the TLS certificate served on the port.",
            PORT_LABELS,
        )
        last_change = _gauge(
            "port_last_change_timestamp_seconds",
            "When the confirmed state of the port last changed.",
            PORT_LABELS,
        )
        success = _gauge(
            "scan_success", "Whether the last scan completed and the host answered.", ["host"]
        )
        last_scan = _gauge(
            "last_scan_timestamp_seconds", "End of the last completed scan.", ["host"]
        )
        duration = _gauge("last_scan_duration_seconds", "Duration of the last scan.", ["host"])
        next_scan = _gauge("next_scan_timestamp_seconds", "When the next scan is due.", ["host"])
        scanned = _gauge("ports_scanned", "Ports probed in the last scan.", ["host"])
        open_ports = _gauge("open_ports", "Confirmed open ports.", ["host"])
        in_progress = _gauge("scan_in_progress", "Whether a scan of the host is running.", ["host"])

        for view in snap.hosts:
            host, state = view.host, view.state
            for status in port_statuses(state):
                labels = [host, str(status.port), "tcp"]
                port_open.add_metric(labels, float(status.open))
                expected.add_metric(labels, float(status.expected))
                unexpected_open.add_metric(labels, float(status.unexpected_open))
                expected_closed.add_metric(labels, float(status.expected_closed))
                service_changed.add_metric(labels, float(status.service_changed))
                for change in PENDING_CHANGES:
                    pending.add_metric([*labels, change], float(status.pending == change))
                if status.last_change is not None:
                    last_change.add_metric(labels, status.last_change)
                identity = status.identity
                if status.open and identity is not None:
                    service_info.add_metric(
                        [*labels, identity.service, identity.product, identity.version], 1.0
                    )
                    if identity.tls is not None:
                        cert_expiry.add_metric(labels, identity.tls.not_after)
            if view.next_scan is not None:
                next_scan.add_metric([host], view.next_scan)
            in_progress.add_metric([host], float(view.scanning))
            open_ports.add_metric([host], float(len(state.confirmed)))
            if state.last_scan is not None:
                success.add_metric([host], float(state.last_scan.success))
                last_scan.add_metric([host], state.last_scan.finished)
                duration.add_metric([host], state.last_scan.duration_seconds)
                scanned.add_metric([host], float(state.last_scan.ports_scanned))
        yield from (port_open, expected, unexpected_open, expected_closed, service_changed)
        yield from (pending, service_info, cert_expiry, last_change)
        yield from (success, last_scan, duration, next_scan, scanned, open_ports, in_progress)

        scans = CounterMetricFamily(
            "portscan_scans", "Scans finished since start, by result.", labels=["host", "result"]
        )
        for (host, result), count in sorted(snap.scans_total.items()):
            scans.add_metric([host, result], float(count))
        probes = CounterMetricFamily(
            "portscan_probes_sent", "Connect attempts made since start.", labels=["host"]
        )
        for host, count in sorted(snap.probes_total.items()):
            probes.add_metric([host], float(count))
        yield scans
        yield probes

        reload_ok = GaugeMetricFamily(
            "portscan_config_last_reload_successful",
            "Whether the last configuration reload attempt was successful.",
            value=float(snap.reload.successful),
        )
        reload_at = GaugeMetricFamily(
            "portscan_config_last_reload_success_timestamp_seconds",
            "Timestamp of the last successful configuration reload.",
            value=snap.reload.last_success_at,
        )
        build = GaugeMetricFamily(
            "portscan_build_info", "Version of portscan-exporter.", labels=["version"]
        )
        build.add_metric([__version__], 1.0)
        yield from (reload_ok, reload_at, build)
