"""JSON renderings of hosts and history, shared by the HTTP API and `history --format json`.

Times are unix seconds (floats), as in the Prometheus HTTP API, so that the output feeds
straight back into `?since=`/`?until=` and into tools that do arithmetic on it. Service
identities stored as fingerprints (see `exporter.model.encode_fingerprint`) are decoded back
into named fields, with the raw fingerprint kept for exact comparisons.
"""

from __future__ import annotations

from typing import Any

from exporter.daemon.snapshot import HostView
from exporter.model import decode_fingerprint
from exporter.state import HostState, Pending, host_status, port_statuses
from exporter.store import History, Interval, ScanRecord, StoredEvent

__all__ = [
    "fingerprint_to_json",
    "history_to_json",
    "host_to_json",
]


def fingerprint_to_json(fingerprint: str | None) -> dict[str, Any] | None:
    """A stored fingerprint as named fields; None stays None (closed, or nothing known)."""
    if fingerprint is None:
        return None
    service, product, version, cert = decode_fingerprint(fingerprint)
    return {
        "service": service,
        "product": product,
        "version": version,
        "tls_sha256": cert or None,
        "fingerprint": fingerprint,
    }


def _pending_to_json(pending: Pending, confirmations: int) -> dict[str, Any]:
    observed = pending.observed
    return {
        "change": pending.target.label,
        "count": pending.count,
        "confirmations": confirmations,
        "first_seen": pending.first_seen,
        "last_seen": pending.last_seen,
        "service": fingerprint_to_json(pending.target.service),
        "observed": None if observed is None else observed.to_json(),
    }


def _ports_to_json(state: HostState, confirmations: int) -> list[dict[str, Any]]:
    ports = []
    for status in port_statuses(state):
        change = state.in_force.get(status.port)
        pending = state.pending.get(status.port)
        identity = status.identity
        ports.append(
            {
                "port": status.port,
                "protocol": "tcp",
                "open": status.open,
                "expected": status.expected,
                "identity": None if identity is None else identity.to_json(),
                "baseline": fingerprint_to_json(state.baseline.get(status.port)),
                "change": None
                if change is None
                else {
                    "event": change.kind.value,
                    "since": change.since,
                    "old_service": fingerprint_to_json(change.old),
                    "new_service": fingerprint_to_json(change.new),
                },
                "pending": None if pending is None else _pending_to_json(pending, confirmations),
                "last_change": status.last_change,
            }
        )
    return ports


def host_to_json(view: HostView, now: float) -> dict[str, Any]:
    """One host as the status page shows it: status word, last/next scan, ports that matter."""
    state = view.state
    spec = view.spec
    last = state.last_scan
    return {
        "host": view.host,
        "address": None if last is None else last.address,
        "status": host_status(state).value,
        "baseline_source": None if state.baseline_source is None else state.baseline_source.value,
        "config": {
            "source": spec.source,
            "ports": len(spec.ports),
            "interval_seconds": spec.interval,
            "confirmations": spec.confirmations,
            "expected_open": None if spec.expected_open is None else list(spec.expected_open),
        },
        "scanning": view.scanning,
        "last_scan": None
        if last is None
        else {
            "started": last.started,
            "finished": last.finished,
            "duration_seconds": last.duration_seconds,
            "result": last.outcome.value,
            "ports_scanned": last.ports_scanned,
            "open_ports": last.open_ports,
            "address": last.address,
            "error": last.error,
            "age_seconds": max(0.0, now - last.finished),
        },
        "next_scan": view.next_scan,
        "next_scan_in_seconds": None if view.next_scan is None else view.next_scan - now,
        "open_ports": sorted(state.confirmed),
        "changes_in_force": len(state.in_force),
        "pending_changes": len(state.pending),
        "ports": _ports_to_json(state, spec.confirmations),
    }


def _event_to_json(stored: StoredEvent) -> dict[str, Any]:
    event = stored.event
    return {
        "id": stored.id,
        "scan_id": stored.scan_id,
        "at": event.at,
        "port": event.port,
        "protocol": None if event.port is None else "tcp",
        "event": event.kind.value,
        "severity": event.severity.value,
        "resolved": event.resolved,
        "old_service": fingerprint_to_json(event.old_service),
        "new_service": fingerprint_to_json(event.new_service),
    }


def _interval_to_json(interval: Interval) -> dict[str, Any]:
    return {
        "port": interval.port,
        "protocol": "tcp",
        "service": interval.service,
        "product": interval.product,
        "version": interval.version,
        "tls_sha256": interval.tls_sha256,
        "fingerprint": interval.fingerprint,
        "start": interval.start,
        "last_seen": interval.last_seen,
        "end": interval.end,
    }


def _scan_to_json(scan: ScanRecord) -> dict[str, Any]:
    return {
        "id": scan.id,
        "started": scan.started,
        "finished": scan.finished,
        "duration_seconds": scan.finished - scan.started,
        "result": scan.result,
        "address": scan.address,
        "ports_scanned": scan.ports_scanned,
        "open_ports": scan.open_ports,
        "probes_sent": scan.probes_sent,
        "error": scan.error,
        "events": scan.events,
    }


def history_to_json(host: str, history: History) -> dict[str, Any]:
    """Events (oldest first), port timeline intervals (by port) and scans of one host."""
    return {
        "host": host,
        "events": [_event_to_json(e) for e in history.events],
        "intervals": [_interval_to_json(i) for i in history.intervals],
        "scans": [_scan_to_json(s) for s in history.scans],
    }
