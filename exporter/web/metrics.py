"""The /metrics exposition, rendered from the current Snapshot.

No scan, no SQL and no lock of the daemon's happen at scrape time: the snapshot is an
immutable value the daemon replaces as hosts change. Per-port series exist only for the
ports that matter (open now, in the baseline, pending, or with a change in force), so a host
scanned on all 65,535 ports costs a handful of series, not 65,535, and a scanned host with
no such port costs five gauges and its two counters.

Fleets go up to 65,536 hosts: some 470,000 series, 28 MB of text (2.6 MB gzipped), and a
busy daemon publishes a new snapshot after every scan start and end, hundreds a second, of
which only the hosts scanned since the last scrape differ. So nothing is redone for a host
whose view did not change, and little for the families none of whose lines changed:

- Lines, per host and family. `render_host` formats the lines of one host, one string per
  family of HOST_FAMILIES, and each family keeps a column: the lines of every host, in
  config order. The daemon reuses a host's `HostView` object while nothing about the host
  changed, so a new snapshot is compared with the last one rendered view by view, by
  identity and at C speed, and only the hosts whose view is a new object are formatted
  again; a family changes only if one of their lines does. Hosts added, removed or moved
  (a reload) rebuild the columns, reusing the lines of every view already rendered. The two
  per-host counters come from mappings the daemon copies into each snapshot: their counts
  are compared with the last ones position by position, also in C, and only the samples
  that moved are formatted again.
- Blocks, per run of families. The body is a sequence of blocks of bytes, each the text of
  adjacent families, kept while none of them changes. A block holding a family that changed
  is made anew (joins of the columns) as runs of the families that changed and runs of
  those that did not. A scan moves its host's last and next scan times and its counters,
  seldom its ports or its success; those families come last in exposition order, so after a
  render or two they are one block made anew on each render (21 MB at 65,536 hosts), and
  the rest are blocks that stay.
- Compression, per block. A block is compressed on its own (raw deflate from a fresh
  compressor, ended by a sync flush, so that it refers to nothing before it; see
  `deflate_blocks`) the first time a compressed scrape needs it, and the result is kept with
  the block, with its CRC-32 or Adler-32. A gzip or deflate body is then the coding's
  header, the kept compressed blocks, the process part compressed to the end of the stream,
  and the trailer: the checksum of the whole text, combined from those of its blocks as zlib
  combines them, and for gzip its length. One well-formed stream, of which a new snapshot
  costs only its new blocks. Blocks above FAST_ABOVE bytes are compressed at zlib level 1
  rather than the default 6: the 21 MB block of a large fleet then takes some 55 ms rather
  than 185 ms, for 13% more bytes. Each compression or checksum of a large buffer lets go of
  the interpreter and has to wait for it again when the daemon is busy, so fewer, larger
  blocks also mean fewer such waits.

A busy scrape target is also scraped far more often than its snapshot changes (several
Prometheus replicas, federation, people with curl). So the portscan_* part is rendered once
per Snapshot object: the last snapshot rendered and its body are kept, and every scrape that
reads that same snapshot gets the same bytes. One render runs at a time; a scrape that finds
a render under way waits for it, then takes the newest snapshot, which is the one just
rendered or a newer one, never an older one than it read. N concurrent scrapes thus cost one
render, and scrapers cannot take more than one thread's share of the interpreter for
rendering, whatever their number. A snapshot that changes no block (a scan starting) shares
the previous body, joined and compressed forms included.

Scrapes in a crowd rarely read the same snapshot, though. The HTTP handler therefore goes
through `scrape()`, which batches them: one batch is encoded at a time, in one thread, and
the requests that arrive meanwhile all take the next batch's body, read after they arrived.

The process_*/python_* collectors are appended from a prometheus_client registry on every
scrape: they describe the process now (CPU seconds, memory, open descriptors), and they cost
about 0.2 ms, little beside the rest.

One format: the Prometheus text format 0.0.4, whatever the scraper's `Accept` lists first.
Prometheus asks for OpenMetrics first by default and parses whichever format the
Content-Type names, as it does for node_exporter and blackbox_exporter (client_golang
serves OpenMetrics only when the exporter opts in). What OpenMetrics adds would buy little
here: every series but a few counters is a gauge, there are no exemplars, `# UNIT` and the
info type change no query, and the counters' `_created` samples would be stored as extra
series by a Prometheus that does not run with created-timestamp ingestion. A second renderer
(and a second set of columns) is not worth that, so the body does not depend on `Accept`.
The coding is picked from Accept-Encoding as aiohttp picks it for other responses.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import compress, count, groupby
from operator import is_not, ne
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, generate_latest

from exporter import __version__
from exporter.daemon.snapshot import HostView, Snapshot
from exporter.model import decode_fingerprint
from exporter.state import port_statuses
from exporter.web.deflate_blocks import CODINGS, Block, finish, frame

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, type, help) of the per-host and per-port families, in exposition order; the two
# per-host counters and the daemon's own series follow them.
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
        "A change seen on the last scan(s) but not yet confirmed, present only while pending.",
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
        "Consecutive scans that must see a change before it is confirmed (hosts with ports).",
    ),
    ("portscan_scan_success", "gauge", "Whether the last scan completed and the host answered."),
    ("portscan_ports_scanned", "gauge", "Ports probed in the last scan."),
    # Last: what every scan changes, next to the counters that follow (see _regroup).
    ("portscan_last_scan_timestamp_seconds", "gauge", "End of the last completed scan."),
    (
        "portscan_last_scan_duration_seconds",
        "gauge",
        "Duration of the last TCP scan (identifying the open ports afterwards not included).",
    ),
    ("portscan_next_scan_timestamp_seconds", "gauge", "When the next scan is due."),
)
_INDEX = {name: i for i, (name, _, _) in enumerate(HOST_FAMILIES)}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    # Booleans and ints arrive here too (typing lets them pass as float): 1, 0, 1764150000.25.
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return repr(value)


def _seconds(value: float) -> str:
    # Times and durations to the millisecond, the resolution Prometheus keeps for its own
    # timestamps: digits below it are noise to a reader and cannot be compressed.
    return _num(round(value, 3))


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

    def add(name: str, labels: str, value: float | str) -> None:
        text = value if isinstance(value, str) else _num(value)
        parts[_INDEX[name]].append(f"{name}{{{labels}{where}}} {text}\n")

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
    statuses = port_statuses(state)
    for status in statuses:
        labels = f'host="{host}",port="{status.port}",protocol="tcp"'
        if view.filtered is not None:
            add("portscan_port_filtered", labels, status.port in view.filtered)
        add("portscan_port_open", labels, status.open)
        add("portscan_port_expected", labels, status.expected)
        add("portscan_port_unexpected_open", labels, status.unexpected_open)
        add("portscan_port_expected_closed", labels, status.expected_closed)
        add("portscan_port_service_changed", labels, status.service_changed)
        # One series while a change is pending, none otherwise: a port has at most one
        # pending change, and a 0 for every other kind would be most of the per-port series.
        if status.pending is not None:
            add("portscan_port_change_pending", f'{labels},change="{status.pending}"', 1)
        if status.last_change is not None:
            add(
                "portscan_port_last_change_timestamp_seconds",
                labels,
                _seconds(status.last_change),
            )
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
    # What the alert texts read about a port change ("confirmed on N consecutive scans"):
    # only a host with per-port series can have one, and the setting is the same for most
    # hosts, so a fleet of hosts with no open port does not carry one constant per host.
    if statuses:
        add("portscan_confirmations_required", labels, view.spec.confirmations)
    if view.next_scan is not None:
        add("portscan_next_scan_timestamp_seconds", labels, _seconds(view.next_scan))
    if state.last_scan is not None:
        add("portscan_scan_success", labels, state.last_scan.success)
        add("portscan_last_scan_timestamp_seconds", labels, _seconds(state.last_scan.finished))
        add(
            "portscan_last_scan_duration_seconds",
            labels,
            _seconds(state.last_scan.duration_seconds),
        )
        add("portscan_ports_scanned", labels, state.last_scan.ports_scanned)
    return tuple("".join(lines) for lines in parts)


def _single(name: str, doc: str, value: float, labels: str = "") -> str:
    sample = f"{name}{{{labels}}}" if labels else name
    return _header(name, "gauge", doc) + f"{sample} {_num(value)}\n"


def negotiate(accept_encoding: str) -> str | None:
    """The coding of the response to a request with this Accept-Encoding; None: identity.

    The same choice as aiohttp's `enable_compression()`: the first of deflate, gzip and
    identity named anywhere in the header, case aside."""
    accept = accept_encoding.lower()
    for coding in (*CODINGS, "identity"):
        if coding in accept:
            return coding if coding in CODINGS else None
    return None


K = TypeVar("K", bound=Hashable)


class _Counter(Generic[K]):
    """A counter family whose samples come from a mapping key -> count, of which the daemon
    puts a new copy in each snapshot: only the samples whose count changed since the last
    mapping rendered are formatted again.

    The copies keep their keys in the order they were first counted (a dict's insertion
    order), so the keys last rendered are a prefix of the new ones, and the counts are
    compared position by position, in C. Keys that went away or moved (hosts a reload
    removed) make the family anew."""

    def __init__(self, name: str, doc: str, labels: Callable[[K], str]) -> None:
        self.header = _header(f"{name}_total", "counter", doc)
        self._sample = f"{name}_total{{"
        self._labels = labels
        self._counts: Mapping[K, int] | None = None
        self._where = ""
        self._keys: list[K] = []
        self._values: list[int] = []
        self.lines: list[str] = []

    def _line(self, key: K, n: int) -> str:
        return f"{self._sample}{self._labels(key)}{self._where}}} {n}\n"

    def update(self, counts: Mapping[K, int], where: str) -> bool:
        """Take the counts of a new snapshot; whether a line changed."""
        if self._counts is not None and where == self._where:
            if counts is self._counts:
                return False
            keys, known = list(counts), len(self._keys)
            # List equality tests identity first, and the copies share their key objects.
            if keys[:known] == self._keys:
                values, lines = list(counts.values()), self.lines
                changed = list(compress(count(), map(ne, values, self._values)))
                for i in changed:
                    lines[i] = self._line(keys[i], values[i])
                for i in range(known, len(keys)):
                    lines.append(self._line(keys[i], values[i]))
                self._counts, self._keys, self._values = counts, keys, values
                return bool(changed) or len(keys) > known
        self._counts, self._where = counts, where
        self._keys, self._values = list(counts), list(counts.values())
        self.lines = [self._line(key, n) for key, n in counts.items()]
        return True


def _scan_labels(key: tuple[str, str]) -> str:
    return f'host="{_escape(key[0])}",result="{key[1]}"'


def _host_label(host: str) -> str:
    return f'host="{_escape(host)}"'


# Families in exposition order past HOST_FAMILIES: the two counters, then the daemon's own.
_SCANS = len(HOST_FAMILIES)
_PROBES = _SCANS + 1
_DAEMON = _SCANS + 2
_FAMILIES = _DAEMON + 1


@dataclass(eq=False)
class _Body:
    """The portscan_* part of a body, as blocks; joined and compressed when first asked for."""

    blocks: tuple[Block, ...]
    joined: bytes | None = None
    # coding -> (header and every block compressed, checksum of the text, its length)
    compressed: dict[str, tuple[bytes, int, int]] = field(default_factory=dict)


@dataclass(eq=False)
class _Rendered:
    snapshot: Snapshot
    body: _Body


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
        # Held for the whole of a render or a compression, so one runs at a time and waiters
        # reuse its result. The state from here to _last is used under it only.
        self._lock = threading.Lock()
        # The views last rendered and their vantage; per family of HOST_FAMILIES, the lines
        # of every host, in the views' order.
        self._views: tuple[HostView, ...] = ()
        self._vantage: str | None = None
        self._columns: list[list[str]] = [[] for _ in HOST_FAMILIES]
        self._headers = [_header(*family) for family in HOST_FAMILIES]
        self._scans: _Counter[tuple[str, str]] = _Counter(
            "portscan_scans", "Scans finished since start, by result.", _scan_labels
        )
        self._probes: _Counter[str] = _Counter(
            "portscan_probes_sent", "Connect attempts made since start.", _host_label
        )
        self._daemon = ""
        # The body last rendered, as (first family, family past the last, block) runs, and
        # the families whose text changed since (kept until a render ends, should one fail).
        self._runs: list[tuple[int, int, Block]] = []
        self._dirty: set[int] = set()
        # The last snapshot rendered and its body; replaced as a whole, so a reader without
        # the lock sees a body that matches its snapshot.
        self._last: _Rendered | None = None
        # Requests waiting for the next batch, by coding, and the task that encodes batches
        # (see scrape()); used from the serving loop only.
        self._waiting: dict[str | None, asyncio.Future[bytes]] = {}
        self._encoder: asyncio.Task[None] | None = None

    def __call__(self) -> tuple[bytes, str]:
        """(body, content type) of one scrape."""
        body = self._joined(self._rendered().body)
        if self._process is not None:
            body += generate_latest(self._process)
        return body, CONTENT_TYPE

    def portscan_body(self) -> bytes:
        """The portscan_* part of the body, for the current snapshot or a newer one.

        The same bytes object for every call that reads the same snapshot."""
        return self._joined(self._rendered().body)

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
        body = self._rendered().body
        process = self._process_part()
        bodies: dict[str | None, bytes] = {}
        for coding in codings:
            if coding is None:
                joined = self._joined(body)
                bodies[coding] = joined + process if process else joined
            else:
                bodies[coding] = finish(coding, self._framed(body, coding), process)
        return bodies

    def _process_part(self) -> bytes:
        return b"" if self._process is None else generate_latest(self._process)

    def _joined(self, body: _Body) -> bytes:
        joined = body.joined
        if joined is None:
            with self._lock:  # once per body, however many scrapes ask at the same time
                joined = body.joined
                if joined is None:
                    joined = body.joined = b"".join([block.data for block in body.blocks])
        return joined

    def _framed(self, body: _Body, coding: str) -> tuple[bytes, int, int]:
        framed = body.compressed.get(coding)
        if framed is None:
            with self._lock:  # one compression at a time, and once per body
                framed = body.compressed.get(coding)
                if framed is None:
                    framed = body.compressed[coding] = frame(coding, body.blocks)
        return framed

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
            self._update(snap)
            if last is not None and not self._dirty:
                body = last.body  # nothing exported changed: its joined and compressed forms
            else:
                self._regroup(self._dirty)
                self._dirty = set()
                body = _Body(tuple(block for _, _, block in self._runs))
            last = self._last = _Rendered(snap, body)
            return last

    def _update(self, snap: Snapshot) -> None:
        """Bring every family up to date with `snap`, adding those that changed to _dirty."""
        where = vantage_labels(snap.vantage)
        dirty = self._dirty
        self._update_hosts(tuple(snap.hosts), snap.vantage)
        if self._scans.update(snap.scans_total, where):
            dirty.add(_SCANS)
        if self._probes.update(snap.probes_total, where):
            dirty.add(_PROBES)
        daemon = _daemon_text(snap, where)
        if daemon != self._daemon:
            self._daemon = daemon
            dirty.add(_DAEMON)

    def _update_hosts(self, views: tuple[HostView, ...], vantage: str | None) -> None:
        """Bring the columns up to date with these views."""
        old, columns, dirty = self._views, self._columns, self._dirty
        if self._runs and vantage == self._vantage and len(views) == len(old):
            changed = list(compress(count(), map(is_not, views, old)))
            if all(views[i].host == old[i].host for i in changed):
                for i in changed:
                    for family, lines in enumerate(self._render_host(views[i], vantage)):
                        if lines != columns[family][i]:
                            columns[family][i] = lines
                            dirty.add(family)
                self._views = views
                return
        # The first render, another vantage, or hosts added, removed or moved (a reload):
        # every column anew, with the lines of every view rendered last as they were.
        kept: dict[str, tuple[HostView, tuple[str, ...]]] = {}
        if vantage == self._vantage:
            kept = {
                view.host: (view, lines)
                for view, lines in zip(old, zip(*columns, strict=True), strict=True)
            }
        rows = []
        for view in views:
            known = kept.get(view.host)
            if known is not None and known[0] is view:
                rows.append(known[1])
            else:
                rows.append(self._render_host(view, vantage))
        self._columns = [list(column) for column in zip(*rows, strict=True)] or [
            [] for _ in HOST_FAMILIES
        ]
        self._views, self._vantage = views, vantage
        dirty.update(range(len(HOST_FAMILIES)))

    def _regroup(self, dirty: set[int]) -> None:
        """New blocks for the runs that hold a changed family; the other runs are kept.

        A broken run is made anew as runs of adjacent families that changed and runs of
        those that did not, so the families that change with every scan (the last and next
        scan times, the counters: adjacent in exposition order) end up as one block, made
        and compressed in one piece per render, and the others as blocks that are kept."""
        if not self._runs:  # the first render: every family changed, one run
            self._runs = self._make_runs(list(range(_FAMILIES)), dirty)
            return
        runs: list[tuple[int, int, Block]] = []
        broken: list[int] = []  # families of broken runs, adjacent
        for start, stop, block in self._runs:
            if dirty.isdisjoint(range(start, stop)):
                runs.extend(self._make_runs(broken, dirty))
                broken = []
                runs.append((start, stop, block))
            else:
                broken.extend(range(start, stop))
        runs.extend(self._make_runs(broken, dirty))
        self._runs = runs

    def _make_runs(self, families: list[int], dirty: set[int]) -> list[tuple[int, int, Block]]:
        """New blocks for adjacent `families`: one per run that changed or did not."""
        runs = []
        for _, group in groupby(families, key=dirty.__contains__):
            members = list(group)
            start, stop = members[0], members[-1] + 1
            runs.append((start, stop, Block(self._text(start, stop))))
        return runs

    def _text(self, start: int, stop: int) -> bytes:
        """The text of families start to stop (excluded), in exposition order."""
        pieces: list[str] = []
        for family in range(start, stop):
            if family < _SCANS:
                pieces.append(self._headers[family])
                pieces.extend(self._columns[family])
            elif family in (_SCANS, _PROBES):
                counter = self._scans if family == _SCANS else self._probes
                pieces.append(counter.header)
                pieces.extend(counter.lines)
            else:
                pieces.append(self._daemon)
        return "".join(pieces).encode()


def _daemon_text(snap: Snapshot, where: str) -> str:
    """The series about the daemon rather than its hosts: a few lines, rendered every time."""
    labels = where[1:]
    store, reload = snap.store, snap.reload
    errors = "portscan_store_write_errors_total"
    out = [
        _header(
            errors,
            "counter",
            "Scans whose results the store refused to record (full disk, locked database).",
        ),
        f"{errors}{{{labels}}} " if labels else f"{errors} ",
        f"{store.write_errors_total}\n",
        _single(
            "portscan_store_last_write_successful",
            "Whether the last write to the store succeeded.",
            store.last_write_ok,
            labels,
        ),
    ]
    if store.last_success_at is not None:
        out.append(
            _single(
                "portscan_store_last_write_success_timestamp_seconds",
                "When the store last recorded a scan.",
                round(store.last_success_at, 3),
                labels,
            )
        )
    out.append(
        _single(
            "portscan_config_last_reload_successful",
            "Whether the last configuration reload attempt was successful.",
            reload.successful,
            labels,
        )
    )
    out.append(
        _single(
            "portscan_config_last_reload_success_timestamp_seconds",
            "Timestamp of the last successful configuration reload.",
            round(reload.last_success_at, 3),
            labels,
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
    return "".join(out)
