"""/metrics as Prometheus sees it: the production exposition, served for real and parsed.

The app serves `SnapshotExposition` (what run.py wires) over snapshots of host states that
the state machine produced from scans (the lab of test_http.py, counted by the daemon's
ScanReport), with the process collectors run.py registers appended. Each body is fetched
over HTTP with a real client, parsed with prometheus_client's parser and linted with
`promtool check metrics`, which must stay silent (DESIGN.md). Only the text format 0.0.4 is
served, whatever Accept asks for; the coding is negotiated from Accept-Encoding as aiohttp does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import re
import shutil
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter import __version__
from exporter.daemon.reporting import StoreHealth
from exporter.daemon.snapshot import HostView, ReloadStatus, Snapshot
from exporter.model import HostScan, ScanResult, ServiceIdentity
from exporter.state import HostState, step
from exporter.web import deflate_blocks
from exporter.web.metrics import CONTENT_TYPE, SnapshotExposition, negotiate, render_host
from tests.test_http import (
    NGINX,
    NOW,
    PORTS,
    SSH,
    Answer,
    LabControl,
    fetch,
    lab_control,
    make_spec,
    populated_lab,
    serving,
)

# What Prometheus 2.x sends on a scrape: OpenMetrics first, the text format as a fallback.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROMTOOL = shutil.which("promtool")
requires_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`)"
)

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def control(tmp_path: Path) -> Iterator[LabControl]:
    with populated_lab(tmp_path) as lab:
        yield lab_control(lab, tmp_path)


def process_registry() -> CollectorRegistry:
    """The registry run.py appends to the snapshot's series."""
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    return registry


def constant_registry() -> CollectorRegistry:
    """An appended registry whose text does not change between scrapes (python_info)."""
    registry = CollectorRegistry()
    PlatformCollector(registry=registry)
    return registry


def parse(text: str) -> tuple[dict[str, str], Series]:
    """(family name -> type, (sample name, labels) -> value); duplicates fail the test."""
    types: dict[str, str] = {}
    series: Series = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in types, f"family {family.name} exposed twice"
        assert family.documentation, f"family {family.name} has no HELP"
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in series, f"series exposed twice: {key}"
            series[key] = sample.value
    return types, series


def value(series: Series, name: str, **labels: str | int) -> float | None:
    return series.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def promtool_check(body: bytes) -> str:
    """What `promtool check metrics` prints about the exposition: nothing when it is clean."""
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    report = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 or report, "promtool failed without saying why"
    return report


def exposed_families() -> set[str]:
    """Every portscan_* metric the exporter may expose, by sample name (counters with _total):
    every family has its HELP and TYPE even with no sample, and the one family that comes
    and goes with the daemon's state is made present."""
    snapshot = Snapshot(
        hosts=(),
        reload=ReloadStatus(True, NOW, NOW),
        started_at=NOW,
        config_path="config.yaml",
        ready=True,
        store=StoreHealth(last_success_at=NOW),
    )
    text = SnapshotExposition(lambda: snapshot).portscan_body().decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))


def port(host: str, number: int) -> dict[str, str | int]:
    return {"host": host, "port": number, "protocol": "tcp"}


def open_ports(series: Series) -> dict[str, int]:
    """host -> confirmed open ports: count(portscan_port_open == 1) by (host)."""
    counts: dict[str, int] = {}
    for (name, labels), v in series.items():
        if name == "portscan_port_open" and v == 1:
            host = dict(labels)["host"]
            counts[host] = counts.get(host, 0) + 1
    return counts


async def test_prometheus_reads_every_family(control: LabControl) -> None:
    async with serving(control, process_registry()) as url:
        answer = await fetch(url + "/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert answer.status == 200
    # Asked for OpenMetrics first, as Prometheus does: the text format, and no OpenMetrics EOF.
    assert answer.headers["Content-Type"] == CONTENT_TYPE
    assert answer.headers["Vary"] == "Accept-Encoding"
    assert "# EOF" not in answer.text
    types, series = parse(answer.text)

    gauges = (
        "port_open", "port_expected", "port_unexpected_open", "port_expected_closed",
        "port_service_changed", "port_change_pending", "port_service_info",
        "port_baseline_info", "port_tls_cert_info", "port_filtered", "confirmations_required",
        "port_tls_cert_expiry_timestamp_seconds", "port_last_change_timestamp_seconds",
        "scan_success", "last_scan_timestamp_seconds", "last_scan_duration_seconds",
        "next_scan_timestamp_seconds", "ports_scanned", "config_last_reload_successful",
        "config_last_reload_success_timestamp_seconds", "build_info",
    )  # fmt: skip
    expected = {f"portscan_{name}": "gauge" for name in gauges}
    # The text parser names a counter family without _total; its samples keep it.
    expected |= {"portscan_scans": "counter", "portscan_probes_sent": "counter"}
    # The store's health; its last-success time appears once the daemon has written.
    expected |= {
        "portscan_store_write_errors": "counter",
        "portscan_store_last_write_successful": "gauge",
    }
    assert {name: kind for name, kind in types.items() if name.startswith("portscan_")} == expected
    assert types["process_cpu_seconds"] == "counter" and types["python_info"] == "gauge"

    # db: 22 and 5432 learned as the baseline, 8080 opened on two scans -> PORT_NEW_OPEN.
    db = "db.example.test"
    assert value(series, "portscan_port_open", **port(db, 8080)) == 1
    assert value(series, "portscan_port_expected", **port(db, 8080)) == 0
    assert value(series, "portscan_port_unexpected_open", **port(db, 8080)) == 1
    assert value(series, "portscan_port_unexpected_open", **port(db, 22)) == 0
    assert value(series, "portscan_port_expected", **port(db, 22)) == 1
    assert value(series, "portscan_port_last_change_timestamp_seconds", **port(db, 8080)) == (
        NOW - 180
    )
    # Label values from scans survive escaping and parsing unchanged.
    assert (
        value(
            series,
            "portscan_port_service_info",
            **port(db, 8080),
            service="http",
            product="<script>alert('product')</script>",
            version='1.0"><b onmouseover=alert(1)>',
        )
        == 1
    )
    assert (
        value(
            series,
            "portscan_port_service_info",
            **port(db, 22),
            service="ssh",
            product="OpenSSH",
            version="9.2p1",
        )
        == 1
    )
    # The baseline with its services, for alert texts ("previous baseline: 22/ssh ...").
    baseline = {
        dict(labels)["port"]: (dict(labels)["service"], dict(labels)["product"])
        for (name, labels), _ in series.items()
        if name == "portscan_port_baseline_info" and dict(labels)["host"] == db
    }
    assert baseline == {"22": ("ssh", "OpenSSH"), "5432": ("postgresql", "PostgreSQL")}
    # The setting the alert texts quote, for the hosts that have ports to alert on.
    assert {
        dict(labels)["host"]: v
        for (name, labels), v in series.items()
        if name == "portscan_confirmations_required"
    } == {db: 2, "web.example.test": 2, "mail.example.test": 2, "192.0.2.50": 2}
    # Whether a port was dropped is known only from a scan of this process, not the store.
    assert not any(name == "portscan_port_filtered" for name, _ in series)
    # web: 443 closed on the last scan only -> pending, still open and expected. One series
    # for the change pending, and none for any port with nothing pending.
    web = "web.example.test"
    pending = {
        tuple(sorted(dict(labels).items())): v
        for (name, labels), v in series.items()
        if name == "portscan_port_change_pending"
    }
    assert pending == {
        (("change", "PORT_NOW_CLOSED"), ("host", web), ("port", "443"), ("protocol", "tcp")): 1
    }
    assert value(series, "portscan_port_open", **port(web, 443)) == 1
    assert value(series, "portscan_port_expected_closed", **port(web, 443)) == 0
    assert value(series, "portscan_port_tls_cert_expiry_timestamp_seconds", **port(web, 443)) == (
        NOW + 30 * 86400
    )
    assert (
        value(
            series,
            "portscan_port_tls_cert_info",
            **port(web, 443),
            cert_sha256="ab" * 6,
            subject="CN=web.example.test",
            issuer="CN=Example CA",
        )
        == 1
    )
    assert value(series, "portscan_last_scan_duration_seconds", host=web) == 0.25

    # Per host: the unreachable host failed its last scan; the new one was never scanned.
    assert value(series, "portscan_scan_success", host=db) == 1
    assert value(series, "portscan_scan_success", host="192.0.2.50") == 0
    assert value(series, "portscan_scan_success", host="new.example.test") is None
    assert value(series, "portscan_next_scan_timestamp_seconds", host=db) == NOW + 720
    assert value(series, "portscan_last_scan_timestamp_seconds", host=db) == NOW - 180
    assert value(series, "portscan_ports_scanned", host=db) == len(PORTS)
    # Open ports per host are counted from portscan_port_open, as the dashboards do.
    assert open_ports(series) == {
        "db.example.test": 3, "web.example.test": 2, "mail.example.test": 1, "192.0.2.50": 1,
    }  # fmt: skip

    # The daemon's counters, by result.
    scans = {
        (dict(labels)["host"], dict(labels)["result"]): count
        for (name, labels), count in series.items()
        if name == "portscan_scans_total"
    }
    assert scans == {
        (db, "success"): 3, (web, "success"): 2, ("mail.example.test", "success"): 1,
        ("192.0.2.50", "success"): 1, ("192.0.2.50", "unreachable"): 1,
        ("retired.example.test", "success"): 1,
    }  # fmt: skip
    assert value(series, "portscan_probes_sent_total", host=db) == 0
    assert value(series, "portscan_config_last_reload_successful") == 1
    assert value(series, "portscan_config_last_reload_success_timestamp_seconds") == NOW - 3600
    assert value(series, "portscan_build_info", version=__version__) == 1


@requires_promtool
async def test_promtool_finds_nothing_to_say(control: LabControl) -> None:
    # A failed reload and a host with no answer yet exercise the rarer series too.
    control.reload_status = dataclasses.replace(control.reload_status, successful=False)
    control.publish()
    async with serving(control, process_registry()) as url:
        answer = await fetch(
            url + "/metrics", headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
        )
    assert answer.status == 200
    assert promtool_check(answer.body) == ""


@requires_promtool
def test_promtool_is_heard() -> None:
    # The check above is only worth something if promtool reports what it finds.
    bad = b"# TYPE portscan_things counter\nportscan_things 1\n"
    assert "portscan_things" in promtool_check(bad)


async def test_compression_follows_accept_encoding(control: LabControl) -> None:
    async with serving(control, constant_registry()) as url:
        plain = await fetch(url + "/metrics", skip_auto_headers=["Accept-Encoding"])

        async def raw(encoding: str) -> Answer:
            return await fetch(
                url + "/metrics", headers={"Accept-Encoding": encoding}, decompress=False
            )

        zipped = await raw("gzip")
        deflated = await raw("deflate")
        identity = await raw("identity")
        unsupported = await raw("br")
        head = await fetch(url + "/metrics", "HEAD", headers={"Accept-Encoding": "gzip"})
    assert plain.status == 200 and "Content-Encoding" not in plain.headers
    assert plain.text.startswith("# HELP portscan_port_open ")
    assert len(plain.body) > 4096  # large enough for aiohttp to compress it in a thread

    assert zipped.headers["Content-Encoding"] == "gzip"
    assert int(zipped.headers["Content-Length"]) == len(zipped.body) < len(plain.body) / 4
    assert gzip.decompress(zipped.body) == plain.body
    assert deflated.headers["Content-Encoding"] == "deflate"
    assert zlib.decompress(deflated.body) == plain.body
    for answer in (identity, unsupported):
        assert "Content-Encoding" not in answer.headers and answer.body == plain.body
    for answer in (plain, zipped, deflated, identity, unsupported, head):
        assert answer.headers["Content-Type"] == CONTENT_TYPE
        assert answer.headers["Vary"] == "Accept-Encoding"
    assert head.status == 200 and head.body == b""


async def test_a_new_scan_reaches_the_next_scrape(control: LabControl) -> None:
    """The scanned host's new view is rendered; the views the daemon kept come from the cache."""
    web = "web.example.test"
    async with serving(control, constant_registry()) as url:
        before = await fetch(url + "/metrics")
        # The daemon publishes a snapshot that reuses the HostView of every host not scanned.
        control.lab.scan(web, 0, {80: NGINX}, duration=0.5)
        old = control.snapshot
        views = tuple(
            dataclasses.replace(view, state=control.lab.states[web]) if view.host == web else view
            for view in old.hosts
        )
        control._snapshot = dataclasses.replace(
            old,
            hosts=views,
            scans_total=dict(control.lab.report.scans_total),
        )
        after = await fetch(url + "/metrics")
    _, was = parse(before.text)
    _, now = parse(after.text)
    # The second scan in a row with 443 closed confirms PORT_NOW_CLOSED.
    assert value(was, "portscan_port_expected_closed", **port(web, 443)) == 0
    assert value(now, "portscan_port_expected_closed", **port(web, 443)) == 1
    assert value(now, "portscan_port_open", **port(web, 443)) == 0
    assert value(now, "portscan_port_tls_cert_expiry_timestamp_seconds", **port(web, 443)) is None
    assert value(now, "portscan_last_scan_duration_seconds", host=web) == 0.5
    assert value(now, "portscan_scans_total", host=web, result="success") == 3
    # Confirmed, so no longer pending: the series is gone.
    assert not any(name == "portscan_port_change_pending" for name, _ in now)
    assert value(was, "portscan_port_change_pending", **port(web, 443), change="PORT_NOW_CLOSED")
    # Nothing else moved.
    changed = {key for key in was.keys() | now.keys() if was.get(key) != now.get(key)}
    assert changed and all(dict(labels)["host"] == web for _, labels in changed)


def fleet_snapshot(hosts: int, ports_per_host: int) -> Snapshot:
    """A fleet past its first scan: every host learned `ports_per_host` open ports."""
    views = []
    for i in range(hosts):
        name = f"host-{i:05}.fleet.example.test"
        spec = make_spec(name)
        opened = {22 + 100 * k: SSH for k in range(ports_per_host)}
        result = ScanResult(
            name,
            f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            NOW - 60,
            2.0,
            len(PORTS),
            True,
            tuple(sorted(opened)),
            tuple(p for p in PORTS if p not in opened),
            probes_sent=len(PORTS),
        )
        state = step(
            HostState.initial(name),
            HostScan(result, opened),
            expected_open=None,
            scanned_ports=spec.ports,
            confirmations=spec.confirmations,
        ).new_state
        views.append(HostView(spec, state, NOW + 3600))
    return Snapshot(
        hosts=tuple(views),
        reload=ReloadStatus(True, NOW - 3600, NOW - 3600),
        started_at=NOW - 86400,
        config_path="config.yaml",
        ready=True,
    )


async def test_a_large_fleet_is_served_compressed(control: LabControl) -> None:
    fleet = fleet_snapshot(1000, 4)
    control._snapshot = fleet
    async with serving(control, constant_registry()) as url:
        zipped = await fetch(
            url + "/metrics", headers={"Accept-Encoding": "gzip"}, decompress=False
        )
    assert zipped.headers["Content-Encoding"] == "gzip"
    body = gzip.decompress(zipped.body)
    assert len(body) > 3_000_000
    _, series = parse(body.decode())
    opened = [key for key, v in series.items() if key[0] == "portscan_port_open" and v == 1]
    assert len(opened) == 4000
    assert open_ports(series)["host-00999.fleet.example.test"] == 4


class CountingRenderer:
    """render_host, counting the hosts it renders; `gate` holds every render until set."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def __call__(self, view: HostView, vantage: str | None) -> tuple[str, ...]:
        with self._lock:
            self.hosts.append(view.host)
        self.started.set()
        self.gate.wait(timeout=10)
        return render_host(view, vantage)


def rescheduled(snapshot: Snapshot, index: int) -> Snapshot:
    """The next snapshot the daemon would publish: host `index` is due an hour later."""
    hosts = list(snapshot.hosts)
    due = hosts[index].next_scan
    assert due is not None
    hosts[index] = dataclasses.replace(hosts[index], next_scan=due + 3600)
    return dataclasses.replace(snapshot, hosts=tuple(hosts))


def next_scan(body: bytes, host: str) -> float | None:
    return value(parse(body.decode())[1], "portscan_next_scan_timestamp_seconds", host=host)


def test_concurrent_scrapes_of_one_snapshot_share_one_render() -> None:
    fleet = fleet_snapshot(40, 2)
    current = [fleet]
    renderer = CountingRenderer()
    exposition = SnapshotExposition(lambda: current[0], render_host=renderer)
    scrapers = 16
    # The first render is held until every scraper has called in.
    renderer.gate.clear()
    arrived = threading.Barrier(scrapers + 1)

    def scrape() -> bytes:
        arrived.wait(timeout=10)
        return exposition()[0]

    with ThreadPoolExecutor(scrapers) as pool:
        futures = [pool.submit(scrape) for _ in range(scrapers)]
        arrived.wait(timeout=10)
        assert renderer.started.wait(timeout=10)
        time.sleep(0.05)  # the other scrapers reach the lock meanwhile
        renderer.gate.set()
        bodies = [future.result(timeout=10) for future in futures]
    assert sorted(renderer.hosts) == sorted(view.host for view in fleet.hosts)
    assert all(body is bodies[0] for body in bodies)
    assert exposition()[0] is bodies[0]  # and so does any later scrape of that snapshot

    # A new snapshot is rendered anew, re-rendering only the host whose view changed.
    current[0] = rescheduled(fleet, 7)
    renderer.hosts.clear()
    fresh = exposition()[0]
    assert renderer.hosts == [fleet.hosts[7].host]
    assert fresh is not bodies[0]
    assert next_scan(bodies[0], fleet.hosts[7].host) == NOW + 3600
    assert next_scan(fresh, fleet.hosts[7].host) == NOW + 7200
    assert exposition()[0] is fresh


def test_a_scrape_waiting_for_a_render_never_gets_an_older_snapshot() -> None:
    fleet = fleet_snapshot(10, 1)
    current = [fleet]
    renderer = CountingRenderer()
    exposition = SnapshotExposition(lambda: current[0], render_host=renderer)
    renderer.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(exposition)  # reads `fleet` and renders it, held at the gate
        assert renderer.started.wait(timeout=10)
        current[0] = rescheduled(fleet, 3)  # published while that render is under way
        second = pool.submit(exposition)  # reads the new snapshot and waits for the lock
        time.sleep(0.05)
        renderer.gate.set()
        old, new = first.result(timeout=10)[0], second.result(timeout=10)[0]
    host = fleet.hosts[3].host
    assert next_scan(old, host) == NOW + 3600
    assert next_scan(new, host) == NOW + 7200


def test_the_process_part_is_appended_to_the_shared_body_on_each_scrape() -> None:
    fleet = fleet_snapshot(3, 1)
    registry = constant_registry()
    exposition = SnapshotExposition(lambda: fleet, registry)
    shared = exposition.portscan_body()
    body, content_type = exposition()
    assert content_type == CONTENT_TYPE
    assert body == shared + generate_latest(registry)
    assert exposition.portscan_body() is shared


def common_prefix(a: bytes, b: bytes) -> int:
    shortest = min(len(a), len(b))
    return next((i for i in range(shortest) if a[i] != b[i]), shortest)


def test_each_snapshot_is_compressed_once_and_each_scrape_is_one_stream() -> None:
    fleet = fleet_snapshot(200, 2)
    current = [fleet]
    registry = process_registry()  # changes between scrapes: CPU seconds, gc counts
    exposition = SnapshotExposition(lambda: current[0], registry)
    for coding, decompress in (("gzip", gzip.decompress), ("deflate", zlib.decompress)):
        first, second = exposition.encoded(coding), exposition.encoded(coding)
        # Both carry the compressed snapshot as it was made once; only the tails differ.
        assert common_prefix(first, second) > len(first) * 0.9
        for body in (first, second):
            text = decompress(body)
            assert text.startswith(exposition.portscan_body())
            types, _ = parse(text.decode())
            assert types["process_cpu_seconds"] == "counter"
        assert len(first) < len(exposition.portscan_body()) / 4
    assert negotiate("GZIP, br") == "gzip"
    assert negotiate("gzip, deflate") == "deflate"  # aiohttp's order
    assert negotiate("br;q=1, identity;q=0.5") is None
    assert negotiate("") is None
    assert exposition.encoded(None).startswith(exposition.portscan_body())

    current[0] = rescheduled(fleet, 0)
    host = fleet.hosts[0].host
    assert next_scan(gzip.decompress(exposition.encoded("gzip")), host) == NOW + 7200


async def test_a_crowd_of_scrapes_shares_one_batch_read_after_each_arrived() -> None:
    fleet = fleet_snapshot(40, 2)
    current = [fleet]
    renderer = CountingRenderer()
    exposition = SnapshotExposition(lambda: current[0], constant_registry(), render_host=renderer)
    renderer.gate.clear()  # the first batch is held while the others arrive
    first = asyncio.ensure_future(exposition.scrape("gzip"))
    assert await asyncio.to_thread(renderer.started.wait, 10)
    current[0] = rescheduled(fleet, 5)  # published after the first request, before the crowd
    crowd = [asyncio.ensure_future(exposition.scrape(coding)) for coding in ["gzip"] * 20]
    crowd.append(asyncio.ensure_future(exposition.scrape(None)))
    await asyncio.sleep(0.05)
    renderer.gate.set()
    old = gzip.decompress(await first)
    bodies = [await request for request in crowd]
    # Two batches in all: every host for the first, then only the one that changed.
    assert renderer.hosts == [*(view.host for view in fleet.hosts), fleet.hosts[5].host]
    assert all(body is bodies[0] for body in bodies[:20])
    host = fleet.hosts[5].host
    assert next_scan(old, host) == NOW + 3600
    new = gzip.decompress(bodies[0])
    assert new == bodies[20]
    assert next_scan(new, host) == NOW + 7200


def with_counters(snapshot: Snapshot) -> Snapshot:
    """The snapshot with the counters of one successful scan per host."""
    return dataclasses.replace(
        snapshot,
        scans_total={(view.host, "success"): 1 for view in snapshot.hosts},
        probes_total={view.host: len(PORTS) for view in snapshot.hosts},
    )


def scanned(
    snapshot: Snapshot, index: int, opened: dict[int, ServiceIdentity], at: float
) -> Snapshot:
    """The snapshot after a scan of host `index` that found `opened` open, or no answer at
    all when it is empty: a new view for that host, and its counters moved."""
    hosts = list(snapshot.hosts)
    view = hosts[index]
    result = ScanResult(
        view.host,
        "192.0.2.1",
        at,
        1.25 + index / 1000,
        len(PORTS),
        bool(opened),
        tuple(sorted(opened)),
        tuple(p for p in PORTS if p not in opened) if opened else (),
        probes_sent=len(PORTS),
    )
    state = step(
        view.state,
        HostScan(result, opened),
        expected_open=None,
        scanned_ports=view.spec.ports,
        confirmations=view.spec.confirmations,
    ).new_state
    hosts[index] = dataclasses.replace(view, state=state, next_scan=at + 3600)
    scans = dict(snapshot.scans_total)
    key = (view.host, "success" if opened else "unreachable")
    scans[key] = scans.get(key, 0) + 1
    probes = dict(snapshot.probes_total)
    probes[view.host] = probes.get(view.host, 0) + len(PORTS)
    return dataclasses.replace(snapshot, hosts=tuple(hosts), scans_total=scans, probes_total=probes)


def starting(snapshot: Snapshot, index: int) -> Snapshot:
    """The snapshot published when a scan of host `index` starts: a new view, same series."""
    hosts = list(snapshot.hosts)
    hosts[index] = dataclasses.replace(hosts[index], scanning=True)
    return dataclasses.replace(snapshot, hosts=tuple(hosts))


def removed(snapshot: Snapshot, index: int) -> Snapshot:
    """The snapshot after a reload that removed host `index`, counters included."""
    gone = snapshot.hosts[index].host
    return dataclasses.replace(
        snapshot,
        hosts=tuple(view for view in snapshot.hosts if view.host != gone),
        scans_total={k: n for k, n in snapshot.scans_total.items() if k[0] != gone},
        probes_total={h: n for h, n in snapshot.probes_total.items() if h != gone},
    )


@pytest.mark.parametrize("fast_above", [deflate_blocks.FAST_ABOVE, 0], ids=["level6", "level1"])
def test_a_long_lived_exposition_says_what_a_first_render_says(
    monkeypatch: pytest.MonkeyPatch, fast_above: int
) -> None:
    """Kept lines, blocks and compressed blocks never leave a stale series behind, and every
    compressed body is one stream whose checksum and length match what it carries."""
    monkeypatch.setattr(deflate_blocks, "FAST_ABOVE", fast_above)
    current = [with_counters(fleet_snapshot(30, 2))]
    exposition = SnapshotExposition(lambda: current[0], process_registry())
    changes: list[Callable[[Snapshot], Snapshot]] = [
        lambda s: scanned(s, 3, {22: SSH, 122: SSH}, NOW),  # times and counters move
        lambda s: scanned(s, 4, {22: SSH, 122: SSH, 443: NGINX}, NOW + 1),  # pending
        lambda s: scanned(s, 4, {22: SSH, 122: SSH, 443: NGINX}, NOW + 2),  # confirmed
        lambda s: scanned(s, 5, {}, NOW + 3),  # no answer: a new counter sample
        lambda s: starting(s, 6),
        lambda s: dataclasses.replace(s, hosts=s.hosts[::-1]),  # a reload reordered them
        lambda s: removed(s, 7),
        lambda s: scanned(s, 0, {122: SSH}, NOW + 4),  # 22 closed: pending
        lambda s: dataclasses.replace(s, vantage="outside"),
        lambda s: dataclasses.replace(s, store=s.store.failed(OSError("disk full"))),
        lambda s: scanned(s, 0, {122: SSH}, NOW + 5),  # confirmed closed
        lambda s: scanned(s, 1, {}, NOW + 6),
    ]
    for change in changes:
        before = exposition.portscan_body()
        current[0] = change(current[0])
        body = exposition.portscan_body()
        assert body == SnapshotExposition(lambda: current[0]).portscan_body()
        for coding, decompress in (("gzip", gzip.decompress), ("deflate", zlib.decompress)):
            text = decompress(exposition.encoded(coding))
            assert text.startswith(body)
            types, _ = parse(text.decode())
            assert types["process_cpu_seconds"] == "counter"
        if change is changes[4]:  # a scan starting changes no series: the same body
            assert body is before


def test_a_snapshot_that_changes_no_series_shares_the_compressed_body() -> None:
    current = [with_counters(fleet_snapshot(20, 1))]
    exposition = SnapshotExposition(lambda: current[0], constant_registry())
    first = exposition.encoded("gzip")
    current[0] = starting(current[0], 3)
    assert exposition.encoded("gzip") == first
    current[0] = rescheduled(current[0], 3)
    assert exposition.encoded("gzip") != first


def test_a_quiet_host_costs_five_gauges_and_two_counters() -> None:
    """A host with no open port and nothing in its baseline, scanned: what the README lists."""
    fleet = with_counters(fleet_snapshot(3, 0))
    _, series = parse(SnapshotExposition(lambda: fleet).portscan_body().decode())
    host = fleet.hosts[1].host
    assert {name for name, labels in series if ("host", host) in labels} == {
        "portscan_scan_success",
        "portscan_ports_scanned",
        "portscan_last_scan_timestamp_seconds",
        "portscan_last_scan_duration_seconds",
        "portscan_next_scan_timestamp_seconds",
        "portscan_scans_total",
        "portscan_probes_sent_total",
    }


def test_times_are_exported_to_the_millisecond() -> None:
    fleet = fleet_snapshot(1, 1)
    view = fleet.hosts[0]
    assert view.state.last_scan is not None
    last = dataclasses.replace(view.state.last_scan, finished=NOW + 0.12345, duration_seconds=2 / 3)
    view = dataclasses.replace(
        view, state=dataclasses.replace(view.state, last_scan=last), next_scan=NOW + 1e-4
    )
    text = "".join(render_host(view))
    assert f'portscan_last_scan_timestamp_seconds{{host="{view.host}"}} {NOW + 0.123!r}\n' in text
    assert f'portscan_last_scan_duration_seconds{{host="{view.host}"}} 0.667\n' in text
    assert f'portscan_next_scan_timestamp_seconds{{host="{view.host}"}} {int(NOW)}\n' in text


def test_the_readme_lists_every_metric_exposed() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("| metric | meaning |\n", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`(portscan_[a-z0-9_]+)", table)) == exposed_families()


def test_checksums_combine_as_zlib_computes_them() -> None:
    """The body's CRC-32 and Adler-32 come from its blocks': the same as over the whole."""
    parts = [b"", b"x", b"# HELP a b\n" * 3000, bytes(range(256)) * 70, b"\xff" * 65521]
    crc, adler, whole = 0, 1, b""
    for part in parts:
        crc = deflate_blocks.crc32_combine(crc, zlib.crc32(part), len(part))
        adler = deflate_blocks.adler32_combine(adler, zlib.adler32(part), len(part))
        whole += part
        assert crc == zlib.crc32(whole) and adler == zlib.adler32(whole)
