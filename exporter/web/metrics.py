"""The /metrics exposition, rendered per scrape from the current Snapshot.

No scan, no SQL and no lock happen at scrape time: the snapshot is an immutable value the
daemon replaces after each scan. Per-port series exist only for the ports that matter (open
now, in the baseline, pending, or with a change in force), so a host scanned on all 65,535
ports costs a handful of series, not 65,535.

A thousand hosts make some 40,000 samples. prometheus_client formats them one by one on
every scrape (~0.3 s, several times that while scans compete for the interpreter), so the
text of each host is rendered here instead and kept until that host's view changes: the
daemon reuses a host's `HostView` object while nothing about the host changed, so a scrape
formats only the hosts scanned since the last one. The process_*/python_* collectors are
appended from a prometheus_client registry.

One format: the Prometheus text format 0.0.4, whatever the scraper's `Accept` lists first.
Prometheus asks for OpenMetrics first by default and parses whichever format the
Content-Type names, as it does for node_exporter and blackbox_exporter (client_golang
serves OpenMetrics only when the exporter opts in). What OpenMetrics adds would buy little
here: every series but two counters is a gauge, there are no exemplars, `# UNIT` and the
info type change no query, and the counters' `_created` samples would be stored as extra
series by a Prometheus that does not run with created-timestamp ingestion. A second renderer
(and a second per-host cache) is not worth that, so the body does not depend on `Accept`.
Compression is the HTTP layer's (aiohttp, see app.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest

from exporter import __version__
from exporter.daemon.snapshot import HostView, Snapshot
from exporter.model import decode_fingerprint
from exporter.state import RETURN_TO_BASELINE, EventKind, port_statuses

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PENDING_CHANGES = (
    EventKind.PORT_NEW_OPEN.value,
    EventKind.PORT_NOW_CLOSED.value,
    EventKind.PORT_SERVICE_CHANGED.value,
    RETURN_TO_BASELINE,
)

# (name, type, help) in exposition order. Per-host families first, then the daemon's own.
HOST_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("portscan_port_open", "gauge", "Whether the port is open (confirmed state)."),
    (
        "portscan_port_expected",
        "gauge",
        "Whether the port is in the baseline or expected-open list.",
    ),
    (
        "portscan_port_unexpected_open",
        "gauge",
        "A confirmed PORT_NEW_OPEN is in force: open and not in the baseline.",
    ),
    (
        "portscan_port_expected_closed",
        "gauge",
        "A confirmed PORT_NOW_CLOSED is in force: in the baseline and not open.",
    ),
    (
        "portscan_port_service_changed",
        "gauge",
        "A confirmed PORT_SERVICE_CHANGED is in force: another service than the baseline's.",
    ),
    (
        "portscan_port_change_pending",
        "gauge",
        "A change seen on the last scan(s) but not yet confirmed, by kind of change.",
    ),
    ("portscan_port_service_info", "gauge", "The service identified on an open port."),
    (
        "portscan_port_baseline_info",
        "gauge",
        "A port of the baseline or expected-open list, with the service the baseline holds.",
    ),
    (
        "portscan_port_tls_cert_info",
        "gauge",
        "The TLS certificate served on an open port (SHA-256 prefix, subject, issuer).",
    ),
    (
        "portscan_port_tls_cert_expiry_timestamp_seconds",
        "gauge",
        "notAfter of the TLS certificate served on the port.",
    ),
    (
        "portscan_port_last_change_timestamp_seconds",
        "gauge",
        "When the confirmed state of the port last changed.",
    ),
    (
        "portscan_port_filtered",
        "gauge",
        "Whether the last successful scan got no answer on the port (dropped, not refused).",
    ),
    (
        "portscan_confirmations_required",
        "gauge",
        "Consecutive scans that must see a change before it is confirmed.",
    ),
    ("portscan_scan_success", "gauge", "Whether the last scan completed and the host answered."),
    ("portscan_last_scan_timestamp_seconds", "gauge", "End of the last completed scan."),
    (
        "portscan_last_scan_duration_seconds",
        "gauge",
        "Duration of the last TCP scan (identifying the open ports afterwards not included).",
    ),
    ("portscan_next_scan_timestamp_seconds", "gauge", "When the next scan is due."),
    ("portscan_ports_scanned", "gauge", "Ports probed in the last scan."),
    ("portscan_open_ports", "gauge", "Confirmed open ports."),
    ("portscan_scan_in_progress", "gauge", "Whether a scan of the host is running."),
)
_INDEX = {name: i for i, (name, _, _) in enumerate(HOST_FAMILIES)}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    # Booleans and ints arrive here too (typing lets them pass as float): 1, 0, 1764150000.25.
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return repr(value)


def _header(name: str, kind: str, doc: str) -> str:
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


# How much of a certificate's SHA-256 labels carry: enough to tell two certificates apart.
CERT_PREFIX = 12


def vantage_labels(vantage: str | None) -> str:
    """`,vantage="..."` to append to every series' labels, or nothing when not configured."""
    return f',vantage="{_escape(vantage)}"' if vantage else ""


def render_host(view: HostView, vantage: str | None = None) -> tuple[str, ...]:
    """The sample lines of one host, one string per family of HOST_FAMILIES."""
    parts: list[list[str]] = [[] for _ in HOST_FAMILIES]
    where = vantage_labels(vantage)

    def add(name: str, labels: str, value: float) -> None:
        parts[_INDEX[name]].append(f"{name}{{{labels}{where}}} {_num(value)}\n")

    host, state = _escape(view.host), view.state
    for port, fingerprint in state.baseline.items():
        service = product = version = cert = ""
        if fingerprint is not None:
            service, product, version, cert = decode_fingerprint(fingerprint)
        add(
            "portscan_port_baseline_info",
            f'host="{host}",port="{port}",protocol="tcp",service="{_escape(service)}",'
            f'product="{_escape(product)}",version="{_escape(version)}",'
            f'cert_sha256="{_escape(cert[:CERT_PREFIX])}"',
            1,
        )
    for status in port_statuses(state):
        labels = f'host="{host}",port="{status.port}",protocol="tcp"'
        if view.filtered is not None:
            add("portscan_port_filtered", labels, status.port in view.filtered)
        add("portscan_port_open", labels, status.open)
        add("portscan_port_expected", labels, status.expected)
        add("portscan_port_unexpected_open", labels, status.unexpected_open)
        add("portscan_port_expected_closed", labels, status.expected_closed)
        add("portscan_port_service_changed", labels, status.service_changed)
        for change in PENDING_CHANGES:
            add(
                "portscan_port_change_pending",
                f'{labels},change="{change}"',
                status.pending == change,
            )
        if status.last_change is not None:
            add("portscan_port_last_change_timestamp_seconds", labels, status.last_change)
        identity = status.identity
        if status.open and identity is not None:
            info = (
                f'{labels},service="{_escape(identity.service)}",'
                f'product="{_escape(identity.product)}",version="{_escape(identity.version)}"'
            )
            add("portscan_port_service_info", info, 1)
            tls = identity.tls
            if tls is not None:
                add(
                    "portscan_port_tls_cert_info",
                    f'{labels},cert_sha256="{_escape(tls.sha256[:CERT_PREFIX])}",'
                    f'subject="{_escape(tls.subject)}",issuer="{_escape(tls.issuer)}"',
                    1,
                )
            # notAfter 0 means the certificate could not be decoded: no expiry to show.
            if tls is not None and tls.not_after:
                add("portscan_port_tls_cert_expiry_timestamp_seconds", labels, tls.not_after)
    labels = f'host="{host}"'
    add("portscan_confirmations_required", labels, view.spec.confirmations)
    if view.next_scan is not None:
        add("portscan_next_scan_timestamp_seconds", labels, view.next_scan)
    add("portscan_scan_in_progress", labels, view.scanning)
    add("portscan_open_ports", labels, len(state.confirmed))
    if state.last_scan is not None:
        add("portscan_scan_success", labels, state.last_scan.success)
        add("portscan_last_scan_timestamp_seconds", labels, state.last_scan.finished)
        add("portscan_last_scan_duration_seconds", labels, state.last_scan.duration_seconds)
        add("portscan_ports_scanned", labels, state.last_scan.ports_scanned)
    return tuple("".join(lines) for lines in parts)


def _single(name: str, doc: str, value: float, labels: str = "") -> str:
    sample = f"{name}{{{labels}}}" if labels else name
    return _header(name, "gauge", doc) + f"{sample} {_num(value)}\n"


def _counter(name: str, doc: str, samples: Iterable[tuple[str, float]]) -> str:
    # The text format names a counter family after its samples, _total included.
    body = "".join(
        f"{name}_total{{{labels}}} {_num(value)}\n" if labels else f"{name}_total {_num(value)}\n"
        for labels, value in samples
    )
    return _header(f"{name}_total", "counter", doc) + body


class SnapshotExposition:
    """Renders /metrics. Call it from any thread; each call reads one snapshot."""

    def __init__(
        self, snapshot: Callable[[], Snapshot], process: CollectorRegistry | None = None
    ) -> None:
        self._snapshot = snapshot
        self._process = process  # process_*/python_* collectors, rendered by prometheus_client
        self._cache: dict[str, tuple[HostView, str | None, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def __call__(self) -> tuple[bytes, str]:
        """(body, content type) of one scrape."""
        snap = self._snapshot()
        with self._lock:
            cache = {}
            for view in snap.hosts:
                cached = self._cache.get(view.host)
                if cached is None or cached[0] is not view or cached[1] != snap.vantage:
                    cached = (view, snap.vantage, render_host(view, snap.vantage))
                cache[view.host] = cached
            self._cache = cache
        rendered = [parts for _, _, parts in cache.values()]
        where = vantage_labels(snap.vantage)
        out = []
        for i, (name, kind, doc) in enumerate(HOST_FAMILIES):
            out.append(_header(name, kind, doc))
            out.extend(parts[i] for parts in rendered)
        out.append(
            _counter(
                "portscan_scans",
                "Scans finished since start, by result.",
                (
                    (f'host="{_escape(host)}",result="{result}"{where}', count)
                    for (host, result), count in sorted(snap.scans_total.items())
                ),
            )
        )
        out.append(
            _counter(
                "portscan_probes_sent",
                "Connect attempts made since start.",
                (
                    (f'host="{_escape(host)}"{where}', n)
                    for host, n in sorted(snap.probes_total.items())
                ),
            )
        )
        store = snap.store
        out.append(
            _counter(
                "portscan_store_write_errors",
                "Scans whose results the store refused to record (full disk, locked database).",
                ((where[1:], store.write_errors_total),),
            )
        )
        out.append(
            _single(
                "portscan_store_last_write_successful",
                "Whether the last write to the store succeeded.",
                store.last_write_ok,
                where[1:],
            )
        )
        if store.last_success_at is not None:
            out.append(
                _single(
                    "portscan_store_last_write_success_timestamp_seconds",
                    "When the store last recorded a scan.",
                    store.last_success_at,
                    where[1:],
                )
            )
        reload = snap.reload
        out.append(
            _single(
                "portscan_config_last_reload_successful",
                "Whether the last configuration reload attempt was successful.",
                reload.successful,
                where[1:],
            )
        )
        out.append(
            _single(
                "portscan_config_last_reload_success_timestamp_seconds",
                "Timestamp of the last successful configuration reload.",
                reload.last_success_at,
                where[1:],
            )
        )
        out.append(
            _single(
                "portscan_build_info",
                "Version of portscan-exporter.",
                1,
                f'version="{_escape(__version__)}"{where}',
            )
        )
        body = "".join(out).encode()
        if self._process is not None:
            body += generate_latest(self._process)
        return body, CONTENT_TYPE
