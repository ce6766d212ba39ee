"""JSON renderings of hosts and history, shared by the HTTP API and `history --format json`.

Times are unix seconds (floats), as in the Prometheus HTTP API, so that the output feeds
straight back into `?since=`/`?until=` and into tools that do arithmetic on it. Service
identities stored as fingerprints (see `exporter.model.encode_fingerprint`) are decoded back
into named fields, with the raw fingerprint kept for exact comparisons.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from typing import Any

from exporter.daemon.snapshot import HostView
from exporter.model import decode_fingerprint
from exporter.state import HostState, Pending, host_status, port_statuses
from exporter.store import History, Interval, ScanRecord, StoredEvent

__all__ = [
    "HostsDocument",
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
    return _host_json(view, now, now)


def _host_json(view: HostView, age: float | str, next_in: float | str) -> dict[str, Any]:
    # `age` and `next_in`: the time of the request, or the markers HostsDocument fills in.
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
            "age_seconds": age if isinstance(age, str) else max(0.0, age - last.finished),
        },
        "next_scan": view.next_scan,
        "next_scan_in_seconds": None
        if view.next_scan is None
        else next_in
        if isinstance(next_in, str)
        else view.next_scan - next_in,
        "open_ports": sorted(state.confirmed),
        "changes_in_force": len(state.in_force),
        "pending_changes": len(state.pending),
        "ports": _ports_to_json(state, spec.confirmations),
    }


# Stand-ins for the two values that depend on the time of the request.
_AGE, _NEXT_IN = "\x00age\x00", "\x00next_in\x00"
_MARKERS = re.compile("|".join(re.escape(json.dumps(marker)) for marker in (_AGE, _NEXT_IN)))


class HostsDocument:
    """The body of /api/v1/hosts, for every scrape of it.

    A fleet's document is tens of MB of JSON (24 MB at 65,536 hosts, a second of CPU to
    build from scratch). The daemon replaces a host's view only when the host changes, so the
    text of each host is kept while its view object is the same, as a template of which only
    the two numbers that depend on the time of the request (`age_seconds`,
    `next_scan_in_seconds`) are written per request. The result is exactly
    `json.dumps({"hosts": [host_to_json(view, now) ...]})`. Call from any thread.
    """

    def __init__(self) -> None:
        self._kept: dict[str, tuple[HostView, list[str], list[str]]] = {}
        self._lock = threading.Lock()

    def render(self, views: Iterable[HostView], now: float) -> bytes:
        with self._lock:
            kept: dict[str, tuple[HostView, list[str], list[str]]] = {}
            texts: list[str] = []
            for view in views:
                entry = self._kept.get(view.host)
                if entry is None or entry[0] is not view:
                    entry = (view, *_template(view))
                kept[view.host] = entry
                _, pieces, markers = entry
                if not pieces:  # a marker's text in the data itself: no template
                    texts.append(json.dumps(host_to_json(view, now)))
                    texts.append(", ")
                    continue
                texts.append(pieces[0])
                for marker, piece in zip(markers, pieces[1:], strict=True):
                    texts.append(_fill(marker, view, now))
                    texts.append(piece)
                texts.append(", ")
            self._kept = kept
        if texts:
            texts.pop()  # the last separator
        return ('{"hosts": [' + "".join(texts) + "]}").encode()


def _template(view: HostView) -> tuple[list[str], list[str]]:
    """The host's JSON cut at the markers: (text pieces, the marker between each two)."""
    text = json.dumps(_host_json(view, _AGE, _NEXT_IN))
    markers = [json.loads(found) for found in _MARKERS.findall(text)]
    expected = [_AGE] if view.state.last_scan is not None else []
    expected += [_NEXT_IN] if view.next_scan is not None else []
    if markers != expected:  # a banner or error that reads like a marker: never trust it
        return [], []
    return _MARKERS.split(text), markers


def _fill(marker: str, view: HostView, now: float) -> str:
    last, due = view.state.last_scan, view.next_scan
    if marker == _AGE and last is not None:
        return json.dumps(max(0.0, now - last.finished))
    if marker == _NEXT_IN and due is not None:
        return json.dumps(due - now)
    raise AssertionError(f"marker {marker!r} without its value")


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
