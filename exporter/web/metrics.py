"""The /metrics exposition, rendered per scrape from the current Snapshot.

No scan, no SQL and no lock happen at scrape time: the snapshot is an immutable value the
daemon replaces after each scan. Per-port series exist only for the ports that matter (open
now, in the baseline, pending, or with a change in force), so a host scanned on all 65,535
ports costs a handful of series, not 65,535.

A thousand hosts make some 40,000 samples. prometheus_client formats them one by one on
every scrape (~0.3 s, several times that while scans compete for the interpreter), so the
text of each host is rendered here instead and kept until that host's view changes: the
daemon reuses a host's `HostView` object while nothing about the host changed, so a scrape
formats only the hosts scanned since the last one.

Joining those texts is still a few milliseconds per MB of exposition, and a busy scrape
target is scraped far more often than its snapshot changes (several Prometheus replicas,
federation, people with curl). So the portscan_* part of the body is rendered once per
Snapshot object: the last snapshot rendered and its bytes are kept, and every scrape that
reads that same snapshot gets that same bytes object. One render runs at a time; a scrape
that finds a render under way waits for it, then takes the newest snapshot, which is the one
just rendered or a newer one, never an older one than it read. N concurrent scrapes thus cost
one render, and scrapers cannot take more than one thread's share of the interpreter for
rendering, whatever their number.

A busy daemon publishes a snapshot after every scan start and end, hundreds a second, so
scrapes in a crowd rarely read the same one. The HTTP handler therefore goes through
`scrape()`, which batches them: one batch is encoded at a time, in one thread, and the
requests that arrive meanwhile all take the next batch's body, read after they arrived.

The process_*/python_* collectors are appended from a prometheus_client registry on every
scrape: they describe the process now (CPU seconds, memory, open descriptors), and they cost
about 0.2 ms, little beside the rest.

Compression is the costly part of a scrape: some 25 ms to gzip a thousand hosts' 4 MB at
zlib's default level, against 5 ms to render them anew when one host changed. So it is done
once per snapshot too: the portscan_* part is compressed up to a sync flush, and the
compressor's state is kept with the result; each scrape copies that state (about 30 µs) and
feeds it the process part, which makes one well-formed gzip or zlib stream of the whole body.

One format: the Prometheus text format 0.0.4, whatever the scraper's `Accept` lists first.
Prometheus asks for OpenMetrics first by default and parses whichever format the
Content-Type names, as it does for node_exporter and blackbox_exporter (client_golang
serves OpenMetrics only when the exporter opts in). What OpenMetrics adds would buy little
here: every series but two counters is a gauge, there are no exemplars, `# UNIT` and the
info type change no query, and the counters' `_created` samples would be stored as extra
series by a Prometheus that does not run with created-timestamp ingestion. A second renderer
(and a second per-host cache) is not worth that, so the body does not depend on `Accept`.
The coding is picked from Accept-Encoding as aiohttp picks it for other responses.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest

from exporter import __version__
from exporter.daemon.snapshot import HostView, Snapshot
from exporter.model import decode_fingerprint
from exporter.state import RETURN_TO_BASELINE, EventKind, port_statuses

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Content codings in the order aiohttp tries them against Accept-Encoding, with the zlib
# window bits of each (gzip: a gzip header and trailer; deflate: a zlib stream, as aiohttp).
CODINGS = {"deflate": zlib.MAX_WBITS, "gzip": 16 + zlib.MAX_WBITS}

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


def negotiate(accept_encoding: str) -> str | None:
    """The coding of the response to a request with this Accept-Encoding; None: identity.

    The same choice as aiohttp's `enable_compression()`: the first of deflate, gzip and
    identity named anywhere in the header, case aside."""
    accept = accept_encoding.lower()
    for coding in (*CODINGS, "identity"):
        if coding in accept:
            return coding if coding in CODINGS else None
    return None


@dataclass(eq=False)
class _Rendered:
    """The portscan_* body of one snapshot, and its compressed forms once asked for."""

    snapshot: Snapshot
    body: bytes
    # coding -> (body compressed up to a sync flush, the compressor that produced it). The
    # compressor is only ever copied, never fed again, so it serves concurrent scrapes.
    compressed: dict[str, tuple[bytes, zlib._Compress]] = field(default_factory=dict)


class SnapshotExposition:
    """Renders /metrics. Call it from any thread; each call reads one snapshot.

    `render_host` is the per-host renderer (the module's own unless replaced, e.g. by a
    wrapper that counts calls).
    """

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        process: CollectorRegistry | None = None,
        *,
        render_host: Callable[[HostView, str | None], tuple[str, ...]] = render_host,
    ) -> None:
        self._snapshot = snapshot
        self._process = process  # process_*/python_* collectors, rendered by prometheus_client
        self._render_host = render_host
        self._cache: dict[str, tuple[HostView, str | None, tuple[str, ...]]] = {}
        # Held for the whole of a render, so one runs at a time and waiters reuse its result.
        self._lock = threading.Lock()
        # The last snapshot rendered and its body; replaced as a whole, so a reader without
        # the lock sees a body that matches its snapshot.
        self._last: _Rendered | None = None
        # Requests waiting for the next batch, by coding, and the task that encodes batches
        # (see scrape()); used from the serving loop only.
        self._waiting: dict[str | None, asyncio.Future[bytes]] = {}
        self._encoder: asyncio.Task[None] | None = None

    def __call__(self) -> tuple[bytes, str]:
        """(body, content type) of one scrape."""
        body = self._rendered().body
        if self._process is not None:
            body += generate_latest(self._process)
        return body, CONTENT_TYPE

    def portscan_body(self) -> bytes:
        """The portscan_* part of the body, for the current snapshot or a newer one.

        The same bytes object for every call that reads the same snapshot."""
        return self._rendered().body

    def encoded(self, coding: str | None) -> bytes:
        """The whole body of one scrape, compressed with `coding` (a key of CODINGS; None:
        not compressed)."""
        return self._encode_all((coding,))[coding]

    async def scrape(self, coding: str | None) -> bytes:
        """`encoded(coding)` for a request being served on the running loop, shared with the
        requests that arrive meanwhile.

        One batch is encoded at a time, in a thread: requests that arrive while one is under
        way join the next, which starts when it ends, so every request gets a body read after
        it arrived, and a crowd of scrapers costs one render per batch and one thread of the
        loop's default executor (where the store's writes run too), however large it is."""
        future = self._waiting.get(coding)
        if future is None:
            future = self._waiting[coding] = asyncio.get_running_loop().create_future()
        if self._encoder is None or self._encoder.done():
            self._encoder = asyncio.create_task(self._encode_batches())
        # Shielded: a request that goes away must not cancel the others' body.
        return await asyncio.shield(future)

    async def _encode_batches(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, {}
            try:
                bodies = await asyncio.to_thread(self._encode_all, tuple(batch))
            except Exception as exc:  # each request answers 500, as with any handler error
                for future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            for coding, future in batch.items():
                if not future.done():
                    future.set_result(bodies[coding])

    def _encode_all(self, codings: Iterable[str | None]) -> dict[str | None, bytes]:
        rendered = self._rendered()
        process = self._process_part()
        bodies: dict[str | None, bytes] = {}
        for coding in codings:
            if coding is None:
                bodies[coding] = rendered.body + process if process else rendered.body
                continue
            compressed = rendered.compressed.get(coding)
            if compressed is None:
                with self._lock:  # one compression at a time, and once per snapshot
                    compressed = rendered.compressed.get(coding)
                    if compressed is None:
                        compressor = zlib.compressobj(wbits=CODINGS[coding])
                        head = compressor.compress(rendered.body)
                        head += compressor.flush(zlib.Z_SYNC_FLUSH)
                        compressed = rendered.compressed[coding] = (head, compressor)
            head, compressor = compressed
            tail = compressor.copy()
            bodies[coding] = head + tail.compress(process) + tail.flush()
        return bodies

    def _process_part(self) -> bytes:
        return b"" if self._process is None else generate_latest(self._process)

    def _rendered(self) -> _Rendered:
        snap = self._snapshot()
        last = self._last
        if last is not None and last.snapshot is snap:
            return last
        with self._lock:
            # Whoever held the lock may have rendered this snapshot or a newer one. Snapshots
            # only move forward, so the current one is never older than `snap`.
            snap = self._snapshot()
            last = self._last
            if last is not None and last.snapshot is snap:
                return last
            last = self._last = _Rendered(snap, self._render(snap))
            return last

    def _render(self, snap: Snapshot) -> bytes:
        # Under self._lock.
        cache = {}
        for view in snap.hosts:
            cached = self._cache.get(view.host)
            if cached is None or cached[0] is not view or cached[1] != snap.vantage:
                cached = (view, snap.vantage, self._render_host(view, snap.vantage))
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
        return "".join(out).encode()
