"""The landing page at `/`: what every host looks like now, in plain HTML.

One self-contained page (inline CSS, no script, no external asset) so it works behind any
proxy and under a strict Content-Security-Policy. Everything that comes from a scan (banners,
product names, certificate subjects) is attacker-controlled text and is escaped, attributes
included. Links are relative (`./metrics`) so the page keeps working under a path prefix.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime

from exporter.daemon.snapshot import HostView, Snapshot
from exporter.model import ServiceIdentity, describe_fingerprint
from exporter.state import HostStatus, Severity, host_status, port_statuses
from exporter.state.values import SEVERITY

__all__ = ["ago", "render_status_page", "short_duration", "until"]

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:78rem;
padding:1rem 1.5rem;color:#1f2328;background:#fff;line-height:1.4}
h1{font-size:1.5rem;margin:.2rem 0}h2{font-size:1.15rem;margin:0 0 .3rem}
a{color:#0969da}nav a{margin-right:.9rem}
.meta{color:#59636e;font-size:.9rem;margin:.2rem 0}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:.4rem .6rem;border-radius:4px}
table{border-collapse:collapse;width:100%;margin:.4rem 0 1rem;font-size:.9rem}
th,td{border-bottom:1px solid #d1d9e0;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
section{border:1px solid #d1d9e0;border-radius:6px;padding:.7rem 1rem;margin:1rem 0}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:1rem;font-size:.8rem;
font-weight:600;color:#fff;vertical-align:middle}
.Stable{background:#1a7f37}.Changed{background:#cf222e}.Pending{background:#bf8700}
.Unreachable{background:#6e7781}.Unknown{background:#8c959f}
.sev-high{color:#cf222e;font-weight:600}.sev-medium{color:#9a6700;font-weight:600}
.addr{color:#59636e;font-weight:normal;font-size:.95rem}
.closed{color:#cf222e}.muted{color:#8c959f}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85rem}
pre{white-space:pre-wrap;word-break:break-all;margin:.2rem 0;max-width:36rem}
details summary{cursor:pointer;color:#59636e}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def short_duration(seconds: float) -> str:
    """A compact positive duration: 850ms, 4.2s, 42s, 12m, 3h5m, 2d4h."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m"
    if whole < 86400:
        hours, minutes = whole // 3600, whole % 3600 // 60
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = whole // 86400, whole % 86400 // 3600
    return f"{days}d{hours}h" if hours else f"{days}d"


def ago(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "never"
    delta = now - timestamp
    return "just now" if delta < 1 else f"{short_duration(delta)} ago"


def until(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "not planned"
    delta = timestamp - now
    return "due now" if delta < 1 else f"in {short_duration(delta)}"


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _when(text: str, timestamp: float | None) -> str:
    """Relative time, with the absolute time on hover."""
    if timestamp is None:
        return _e(text)
    return f'<span title="{_e(_utc(timestamp))}">{_e(text)}</span>'


def _identity_cells(identity: ServiceIdentity | None) -> str:
    if identity is None:
        return '<td class="muted">-</td><td></td><td></td><td></td>'
    details = []
    if identity.extra:
        details.append(_e(identity.extra))
    if identity.tls is not None:
        tls = identity.tls
        details.append(
            f"{_e(tls.protocol)} cert {_e(tls.subject)}, expires "
            f'<span title="{_e(_utc(tls.not_after))}">{_e(_utc(tls.not_after)[:10])}</span>'
        )
    if identity.banner:
        details.append(
            f"<details><summary>banner</summary><pre>{_e(identity.banner)}</pre></details>"
        )
    return (
        f"<td>{_e(identity.service)}</td><td>{_e(identity.product)}</td>"
        f"<td>{_e(identity.version)}</td><td>{'<br>'.join(details)}</td>"
    )


def _severity_class(severity: Severity) -> str:
    return f"sev-{severity.value}"


def _host_table(view: HostView, now: float) -> str:
    state = view.state
    statuses = port_statuses(state)
    if not statuses:
        return '<p class="muted">No open port, nothing expected.</p>'
    rows = []
    for status in statuses:
        port = status.port
        if status.open:
            port_state = "open"
        elif status.expected:
            port_state = '<span class="closed">closed</span>'
        else:
            port_state = '<span class="muted">closed</span>'
        baseline = "yes" if status.expected else '<span class="muted">no</span>'
        change_cell = ""
        change = state.in_force.get(port)
        if change is not None:
            old = describe_fingerprint(change.old, missing="not in baseline")
            new = describe_fingerprint(change.new, missing="closed")
            severity = SEVERITY[change.kind]
            change_cell = (
                f'<span class="{_severity_class(severity)}">{_e(change.kind.value)}'
                f" ({severity.word})</span> {_when(ago(change.since, now), change.since)}<br>"
                f"{_e(old)} &rarr; {_e(new)}"
            )
        pending_cell = ""
        pending = state.pending.get(port)
        if pending is not None:
            seen = pending.observed
            seen_text = "closed" if seen is None else describe_fingerprint(seen.fingerprint)
            pending_cell = (
                f"{_e(pending.target.label)} ({pending.count} of"
                f" {view.spec.confirmations} scans)<br>"
                f'<span class="muted">seen: {_e(seen_text)},'
                f" first {_when(ago(pending.first_seen, now), pending.first_seen)}</span>"
            )
        rows.append(
            f"<tr><td>{port}/tcp</td><td>{port_state}</td><td>{baseline}</td>"
            f"{_identity_cells(status.identity)}"
            f"<td>{change_cell}</td><td>{pending_cell}</td></tr>"
        )
    return (
        "<table><thead><tr><th>Port</th><th>State</th><th>Baseline</th><th>Service</th>"
        "<th>Product</th>"
        "<th>Version</th><th>Details</th><th>Change in force</th><th>Pending change</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _anchor(host: str) -> str:
    return "host-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in host)


def _last_scan_text(view: HostView, now: float) -> str:
    last = view.state.last_scan
    if last is None:
        return "never"
    return _when(ago(last.finished, now), last.finished)


def _next_scan_text(view: HostView, now: float) -> str:
    if view.scanning:
        return "scanning now"
    return _when(until(view.next_scan, now), view.next_scan)


def _host_section(view: HostView, now: float) -> str:
    state = view.state
    status = host_status(state)
    last = state.last_scan
    address = "" if last is None or not last.address or last.address == view.host else last.address
    facts = [f"Last scan {_last_scan_text(view, now)}"]
    if last is not None:
        facts.append(
            f"TCP scan took {_e(short_duration(last.duration_seconds))},"
            f" {last.ports_scanned} ports,"
            f" {_e(last.outcome.value)}"
        )
    facts.append(f"next scan {_next_scan_text(view, now)}")
    baseline = "none yet" if state.baseline_source is None else state.baseline_source.value
    facts.append(f"baseline: {_e(baseline)}")
    facts.append(f"{len(state.confirmed)} open")
    error = ""
    if last is not None and last.error:
        error = f'<p class="warn">Last scan failed: {_e(last.error)}</p>'
    elif last is not None and not last.success:
        error = '<p class="warn">The host answered nothing on the last scan.</p>'
    return (
        f'<section id="{_e(_anchor(view.host))}"><h2>{_e(view.host)}'
        + (f' <span class="addr">{_e(address)}</span>' if address else "")
        + f' <span class="badge {_e(status.value)}">{_e(status.value)}</span></h2>'
        f'<p class="meta">{" &middot; ".join(facts)}</p>{error}{_host_table(view, now)}'
        "</section>"
    )


def _overview(hosts: Iterable[HostView], now: float) -> str:
    rows = []
    for view in hosts:
        state = view.state
        status = host_status(state)
        last = state.last_scan
        address = "" if last is None or last.address is None else last.address
        opened = ", ".join(str(p) for p in sorted(state.confirmed)) or "-"
        changes = ", ".join(
            f"{change.kind.value} {port}/tcp" for port, change in sorted(state.in_force.items())
        )
        pending = len(state.pending)
        rows.append(
            f'<tr><td><a href="#{_e(_anchor(view.host))}">{_e(view.host)}</a></td>'
            f"<td>{_e(address)}</td>"
            f'<td><span class="badge {_e(status.value)}">{_e(status.value)}</span></td>'
            f"<td>{_e(opened)}</td><td>{_e(changes)}</td>"
            f"<td>{pending if pending else ''}</td>"
            f"<td>{_last_scan_text(view, now)}</td><td>{_next_scan_text(view, now)}</td>"
            f"<td>{'' if last is None else _e(short_duration(last.duration_seconds))}</td></tr>"
        )
    return (
        "<table><thead><tr><th>Host</th><th>Address</th><th>Status</th><th>Open ports</th>"
        "<th>Changes in force</th><th>Pending</th><th>Last scan</th><th>Next scan</th>"
        "<th>TCP scan time</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _link(path: str) -> str:
    return _e("." + path if path.startswith("/") else path)


def render_status_page(
    snapshot: Snapshot,
    *,
    now: float,
    telemetry_path: str,
    version: str,
    product: str = "portscan-exporter",
) -> str:
    counts = Counter(host_status(view.state) for view in snapshot.hosts)
    summary = ", ".join(
        f"{counts[status]} {status.value}" for status in HostStatus if counts[status]
    )
    reload = snapshot.reload
    if reload.successful:
        reload_text = f"last reload {_when(ago(reload.at, now), reload.at)} successful"
    else:
        reload_text = (
            f'<span class="closed">last reload {_when(ago(reload.at, now), reload.at)} failed:'
            f" {_e(reload.error or 'unknown error')}</span>"
        )
    notices = []
    if not snapshot.ready:
        notices.append('<p class="warn">Starting: the stored state is not loaded yet.</p>')
    if not snapshot.store.last_write_ok:
        notices.append(
            '<p class="warn">The store refuses writes: scans are not recorded and no change'
            f" can alert ({_e(snapshot.store.last_error or 'unknown error')}).</p>"
        )
    body = [
        f"<header><h1>{_e(product)}</h1>",
        f'<p class="meta">version {_e(version)} &middot; up'
        f" {_e(short_duration(max(0.0, now - snapshot.started_at)))} &middot; config"
        f" <code>{_e(snapshot.config_path)}</code>, {reload_text}</p>",
        f'<nav><a href="{_link(telemetry_path)}">Metrics</a>'
        f'<a href="{_link("/api/v1/hosts")}">Hosts (JSON)</a>'
        f'<a href="{_link("/-/healthy")}">Health</a>'
        f'<a href="{_link("/-/ready")}">Readiness</a></nav></header>',
        *notices,
    ]
    if snapshot.hosts:
        body.append(f"<h2>{len(snapshot.hosts)} hosts: {_e(summary)}</h2>")
        body.append(_overview(snapshot.hosts, now))
        body.extend(_host_section(view, now) for view in snapshot.hosts)
    else:
        body.append('<p class="muted">No host is configured.</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(product)}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
