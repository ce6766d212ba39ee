"""The HTTP surface, served for real on 127.0.0.1 and queried with a real client.

The snapshot behind it is made of real values: host states produced by the state machine
from scans, recorded in a real store (history and accept go through it) and counted by the
daemon's ScanReport; /metrics is the production SnapshotExposition over it, with a real
prometheus_client registry appended. Nothing here connects anywhere but to the server the
test started on 127.0.0.1. tests/test_metrics_exposition.py parses and lints /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import html.parser
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, PlatformCollector
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.config import ConfigError, HostSpec, load_config
from exporter.daemon.reporting import ScanReport
from exporter.daemon.snapshot import HostView, ReloadResult, ReloadStatus, Snapshot
from exporter.model import HostScan, ScanResult, ServiceIdentity, TLSInfo, describe_fingerprint
from exporter.state import HostState, step
from exporter.store import History, Store
from exporter.web.app import build_app
from exporter.web.jsonview import HostsDocument, fingerprint_to_json, host_to_json
from exporter.web.listen import ListenError, parse_listen_address, start_server
from exporter.web.metrics import CONTENT_TYPE, SnapshotExposition
from exporter.web.status_page import ago, short_duration, until
from exporter.web.webconfig import TLSServerConfig, WebConfig, load_web_config
from tests.test_webconfig import hash_password, make_cert, requires_openssl

NOW = 1_767_000_000.0  # the server's clock in these tests
PORTS = tuple(range(1, 1025))
TIMEOUT = aiohttp.ClientTimeout(total=15)

SSH = ServiceIdentity("ssh", "OpenSSH", "9.2p1", banner="SSH-2.0-OpenSSH_9.2p1 Debian-2")
POSTGRES = ServiceIdentity("postgresql", "PostgreSQL", "15")
HOSTILE = ServiceIdentity(
    "http",
    "<script>alert('product')</script>",
    '1.0"><b onmouseover=alert(1)>',
    extra="<i>extra</i>",
    banner="HTTP/1.1 200 OK\r\nServer: <img src=x onerror=alert(1)>",
)
NGINX = ServiceIdentity("http", "nginx", "1.24.0")
NGINX_TLS = ServiceIdentity(
    "https",
    "nginx",
    "1.24.0",
    tls=TLSInfo(
        "TLSv1.3",
        "CN=web.example.test",
        "CN=Example CA",
        ("web.example.test",),
        NOW + 30 * 86400,
        "ab" * 32,
    ),
)
SMTP = ServiceIdentity("smtp", "Postfix smtpd")
FTP = ServiceIdentity("ftp", "vsftpd", "3.0.3")

ADDRESSES = {
    "db.example.test": "192.0.2.10",
    "web.example.test": "192.0.2.20",
    "mail.example.test": "192.0.2.25",
    "retired.example.test": "192.0.2.99",
}
CONFIG_YAML = "targets:\n  - host: db.example.test\n  - host: web.example.test\n"


def make_spec(host: str, *, expected_open: tuple[int, ...] | None = None) -> HostSpec:
    return HostSpec(
        host=host,
        ports=PORTS,
        interval=3600.0,
        timeout=1.0,
        retries=1,
        concurrency=100,
        rate=0.0,
        confirmations=2,
        confirm_after=300.0,
        expected_open=expected_open,
        source="config.yaml:3",
    )


SPECS = (
    make_spec("db.example.test"),
    make_spec("web.example.test", expected_open=(80, 443)),
    make_spec("mail.example.test"),
    make_spec("192.0.2.50"),
    make_spec("new.example.test"),
    make_spec("2001:db8::10"),
)


class Lab:
    """Host states made by the real state machine and recorded in a real store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.specs = {spec.host: spec for spec in SPECS}
        self.states = {spec.host: HostState.initial(spec.host) for spec in SPECS}
        self.report = ScanReport()  # portscan_scans_total and portscan_probes_sent_total

    def scan(
        self,
        host: str,
        finished_ago: float,
        services: dict[int, ServiceIdentity] | None,
        *,
        duration: float = 2.0,
    ) -> None:
        """One scan that finished `finished_ago` seconds before NOW; None: no answer."""
        spec = self.specs.get(host) or make_spec(host)
        started = NOW - finished_ago - duration
        address = ADDRESSES.get(host, host)
        if services is None:
            result = ScanResult(host, address, started, duration, len(PORTS), False, filtered=PORTS)
        else:
            opened = tuple(sorted(services))
            closed = tuple(p for p in PORTS if p not in services)
            result = ScanResult(host, address, started, duration, len(PORTS), True, opened, closed)
        scan = HostScan(result, dict(services or {}))
        state = self.states.get(host) or HostState.initial(host)
        transition = step(
            state,
            scan,
            expected_open=spec.expected_open,
            scanned_ports=spec.ports,
            confirmations=spec.confirmations,
        )
        assert self.store.record_scan(scan, transition)
        self.report.scan_finished(spec, scan, transition)
        self.states[host] = transition.new_state

    def populate(self) -> None:
        # db: learned baseline, then 8080 opened on two scans in a row -> Changed.
        self.scan("db.example.test", 7200, {22: SSH, 5432: POSTGRES})
        self.scan("db.example.test", 3600, {22: SSH, 5432: POSTGRES, 8080: HOSTILE})
        self.scan("db.example.test", 180, {22: SSH, 5432: POSTGRES, 8080: HOSTILE})
        # web: expected 80 and 443; 443 closed on the last scan only -> Pending.
        self.scan("web.example.test", 600, {80: NGINX, 443: NGINX_TLS}, duration=0.25)
        self.scan("web.example.test", 60, {80: NGINX}, duration=0.25)
        # mail: one scan, nothing since -> Stable.
        self.scan("mail.example.test", 30000, {25: SMTP})
        # 192.0.2.50 answered once, then nothing at all -> Unreachable.
        self.scan("192.0.2.50", 9000, {22: SSH})
        self.scan("192.0.2.50", 300, None, duration=30.0)
        # A host removed from the config: history only.
        self.scan("retired.example.test", 5000, {21: FTP})


@dataclass
class LabControl:
    """The daemon's side of the HTTP surface, backed by the lab's store."""

    lab: Lab
    config_path: Path
    ready: bool = True
    scanning: frozenset[str] = frozenset({"new.example.test"})
    reload_status: ReloadStatus = field(
        default_factory=lambda: ReloadStatus(True, NOW - 3600, NOW - 3600)
    )
    reloads: int = 0
    _snapshot: Snapshot | None = None

    def publish(self) -> None:
        views = tuple(
            HostView(
                spec,
                self.lab.states[spec.host],
                None if spec.host in self.scanning else NOW + 720,
                scanning=spec.host in self.scanning,
            )
            for spec in SPECS
        )
        self._snapshot = Snapshot(
            hosts=views,
            reload=self.reload_status,
            started_at=NOW - 86400,
            config_path=str(self.config_path),
            ready=self.ready,
            scans_total=dict(self.lab.report.scans_total),
            probes_total=dict(self.lab.report.probes_total),
        )

    @property
    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            self.publish()
        assert self._snapshot is not None
        return self._snapshot

    async def reload(self) -> ReloadResult:
        self.reloads += 1
        try:
            await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            self.reload_status = ReloadStatus(
                False, NOW, self.reload_status.last_success_at, str(exc)
            )
            self.publish()
            return ReloadResult(False, str(exc))
        self.reload_status = ReloadStatus(True, NOW, NOW)
        self.publish()
        return ReloadResult(True)

    async def accept(self, host: str, port: int | None) -> HostState:
        state = await asyncio.to_thread(self.lab.store.accept, host, port, now=NOW)
        self.lab.states[host] = state
        self.publish()
        return state

    async def history(self, host: str, since: float, until: float | None) -> History:
        return await asyncio.to_thread(self.lab.store.history, host, since, until)


class BrokenCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("secret internal detail")


@contextlib.contextmanager
def populated_lab(tmp_path: Path) -> Iterator[Lab]:
    """The lab's hosts scanned into a real store in `tmp_path`; the other HTTP test modules
    build their `control` fixture from it too."""
    store = Store.open(tmp_path / "state.db")
    try:
        lab = Lab(store)
        lab.populate()
        yield lab
    finally:
        store.close()


def lab_control(lab: Lab, tmp_path: Path) -> LabControl:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG_YAML)
    return LabControl(lab, config)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with populated_lab(tmp_path) as lab:
        yield lab


@pytest.fixture
def control(lab: Lab, tmp_path: Path) -> LabControl:
    return lab_control(lab, tmp_path)


@pytest.fixture
def registry() -> CollectorRegistry:
    """Appended to the snapshot's series, as run.py appends the process collectors."""
    registry = CollectorRegistry()
    PlatformCollector(registry=registry)  # python_info alone: constant, so scrapes compare equal
    return registry


def exposition(control: LabControl, registry: CollectorRegistry | None) -> SnapshotExposition:
    """/metrics as the daemon serves it, over the lab's snapshot."""
    return SnapshotExposition(lambda: control.snapshot, registry)


@contextlib.asynccontextmanager
async def serving(
    control: LabControl,
    registry: CollectorRegistry,
    *,
    web_config: WebConfig | None = None,
    telemetry_path: str = "/metrics",
    address: str = "127.0.0.1:0",
) -> AsyncIterator[str]:
    """The app served for real; yields its base URL on 127.0.0.1."""
    app = build_app(
        control,
        exposition(control, registry),
        telemetry_path=telemetry_path,
        web_config=web_config,
        clock=lambda: NOW,
    )
    runner = await start_server(app, address, web_config)
    try:
        port = runner.addresses[0][1]
        tls = web_config is not None and web_config.tls_server_config is not None
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        assert self.headers["Content-Type"].startswith("application/json"), self.headers
        return json.loads(self.body)


async def fetch(
    url: str,
    method: str = "GET",
    *,
    ssl_context: ssl.SSLContext | None = None,
    auth: tuple[str, str] | None = None,
    decompress: bool = True,
    **kwargs: Any,
) -> Answer:
    """One request on its own connection; `auth` is (user, password) for basic auth."""
    headers = dict(kwargs.pop("headers", {}))
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    connector = aiohttp.TCPConnector(force_close=True, ssl=ssl_context or True)
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=TIMEOUT, auto_decompress=decompress
        ) as session,
        session.request(method, url, headers=headers, **kwargs) as response,
    ):
        body = await response.read()
        return Answer(response.status, dict(response.headers), body)


class TagCollector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(name for name, _ in attrs)


# --- landing page ------------------------------------------------------------------------------


async def test_landing_page_shows_every_host(
    control: LabControl, registry: CollectorRegistry
) -> None:
    async with serving(control, registry) as url:
        answer = await fetch(url + "/")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    page = answer.text
    assert "portscan-exporter</h1>" in page and f"version {__version__}" in page
    assert 'href="./metrics"' in page
    sections = {
        section.split("</h2>")[0].split("<h2>")[1]: section
        for section in page.split("<section ")[1:]
    }
    by_host = {key.split(" <span")[0]: value for key, value in sections.items()}
    assert set(by_host) == {spec.host for spec in SPECS}

    db = by_host["db.example.test"]
    assert '<span class="addr">192.0.2.10</span>' in db
    assert '<span class="badge Changed">Changed</span>' in db
    assert "Last scan <span" in db and ">3m ago</span>" in db
    assert ">in 12m</span>" in db and "TCP scan took 2.0s, 1024 ports, success" in db
    assert "<td>22/tcp</td><td>open</td><td>yes</td>" in db
    assert '<td>8080/tcp</td><td>open</td><td><span class="muted">no</span></td>' in db
    assert "<td>ssh</td><td>OpenSSH</td><td>9.2p1</td>" in db
    assert '<span class="sev-high">PORT_NEW_OPEN (High)</span>' in db
    assert "not in baseline &rarr; http &lt;script&gt;" in db

    web = by_host["web.example.test"]
    assert '<span class="badge Pending">Pending</span>' in web
    assert "PORT_NOW_CLOSED (1 of 2 scans)" in web and "seen: closed" in web
    assert "TCP scan took 250ms" in web and ">1m ago</span>" in web
    assert "TLSv1.3 cert CN=web.example.test, expires" in web

    assert '<span class="badge Stable">Stable</span>' in by_host["mail.example.test"]
    assert ">8h20m ago</span>" in by_host["mail.example.test"]
    unreachable = by_host["192.0.2.50"]
    assert '<span class="badge Unreachable">Unreachable</span>' in unreachable
    assert "The host answered nothing on the last scan." in unreachable
    new = by_host["new.example.test"]
    assert '<span class="badge Unknown">Unknown</span>' in new
    assert "Last scan never" in new and "next scan scanning now" in new
    assert "6 hosts: 2 Unknown, 1 Unreachable, 1 Changed, 1 Pending, 1 Stable" in page
    assert "last reload <span" in page and ">1h ago</span> successful" in page


async def test_landing_page_escapes_text_from_scans(
    control: LabControl, registry: CollectorRegistry
) -> None:
    async with serving(control, registry) as url:
        answer = await fetch(url + "/")
    page = answer.text
    parser = TagCollector()
    parser.feed(page)
    assert "script" not in parser.tags and "img" not in parser.tags and "i" not in parser.tags
    assert not [name for name in parser.attributes if name.startswith("on")]
    assert "&lt;script&gt;alert(&#x27;product&#x27;)&lt;/script&gt;" in page
    assert "1.0&quot;&gt;&lt;b onmouseover=alert(1)&gt;" in page
    assert "Server: &lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;i&gt;extra&lt;/i&gt;" in page
    # Defence in depth: even an unescaped script could not run.
    assert answer.headers["Content-Security-Policy"].startswith("default-src 'none'")


async def test_landing_page_while_starting(
    control: LabControl, registry: CollectorRegistry
) -> None:
    control.ready = False
    control.reload_status = ReloadStatus(False, NOW - 30, NOW - 3600, "config.yaml:2: <bad>")
    control.publish()
    async with serving(control, registry) as url:
        page = (await fetch(url + "/")).text
    assert "Starting: the stored state is not loaded yet." in page
    assert "failed: config.yaml:2: &lt;bad&gt;" in page


def test_relative_times() -> None:
    assert [short_duration(s) for s in (0.25, 4.25, 42, 180, 3600, 30000, 90000)] == [
        "250ms", "4.2s", "42s", "3m", "1h", "8h20m", "1d1h",
    ]  # fmt: skip
    assert ago(None, NOW) == "never" and ago(NOW - 0.5, NOW) == "just now"
    assert ago(NOW - 180, NOW) == "3m ago"
    assert until(NOW + 720, NOW) == "in 12m" and until(NOW - 5, NOW) == "due now"
    assert until(None, NOW) == "not planned"


# --- /metrics ----------------------------------------------------------------------------------


async def test_custom_telemetry_path(control: LabControl, registry: CollectorRegistry) -> None:
    async with serving(control, registry, telemetry_path="/internal/scrape") as url:
        moved = await fetch(url + "/internal/scrape")
        old = await fetch(url + "/metrics")
        page = await fetch(url + "/")
    assert moved.status == 200 and moved.headers["Content-Type"] == CONTENT_TYPE
    assert f'portscan_build_info{{version="{__version__}"}} 1\n' in moved.text
    assert old.status == 404 and old.text == "404 page not found\n"
    assert 'href="./internal/scrape"' in page.text


async def test_a_failing_collector_gives_500_without_details(
    control: LabControl, registry: CollectorRegistry
) -> None:
    registry.register(BrokenCollector())
    async with serving(control, registry) as url:
        answer = await fetch(url + "/metrics")
        still_fine = await fetch(url + "/-/healthy")
    assert answer.status == 500
    assert answer.text == "internal server error\n"
    assert "secret" not in answer.text and "Traceback" not in answer.text
    assert still_fine.status == 200


# --- health, readiness, reload -----------------------------------------------------------------


async def test_health_and_readiness(control: LabControl, registry: CollectorRegistry) -> None:
    control.ready = False
    control.publish()
    async with serving(control, registry) as url:
        healthy = await fetch(url + "/-/healthy")
        not_ready = await fetch(url + "/-/ready")
        control.ready = True
        control.publish()
        ready = await fetch(url + "/-/ready")
    assert (healthy.status, healthy.text) == (200, "Healthy\n")
    assert not_ready.status == 503
    assert (ready.status, ready.text) == (200, "Ready\n")


async def test_reload(control: LabControl, registry: CollectorRegistry) -> None:
    async with serving(control, registry) as url:
        ok = await fetch(url + "/-/reload", "POST")
        ok_put = await fetch(url + "/-/reload", "PUT")
        control.config_path.write_text("targets:\n  - host: db.example.test\n    retries: many\n")
        failed = await fetch(url + "/-/reload", "POST")
        get = await fetch(url + "/-/reload")
    assert (ok.status, ok_put.status) == (200, 200)
    assert failed.status == 500
    assert failed.text == (
        f"failed to reload config: {control.config_path}:3: targets[0].retries:"
        " expected an integer, got string 'many'\n"
    )
    assert get.status == 405 and "POST" in get.headers["Allow"]
    assert control.reloads == 3


async def test_reload_endpoint_can_be_disabled(control: LabControl) -> None:
    app = build_app(control, exposition(control, None), enable_lifecycle=False)
    runner = await start_server(app, "127.0.0.1:0", None)
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        refused = await fetch(url + "/-/reload", "POST")
    finally:
        await runner.cleanup()
    assert (refused.status, refused.text) == (403, "Lifecycle API is not enabled.\n")
    assert control.reloads == 0


# --- JSON API ----------------------------------------------------------------------------------


async def test_hosts_api(control: LabControl, registry: CollectorRegistry) -> None:
    async with serving(control, registry) as url:
        everything = (await fetch(url + "/api/v1/hosts")).json()
        db = await fetch(url + "/api/v1/hosts/db.example.test")
        v6 = await fetch(url + "/api/v1/hosts/2001:db8::10")
        missing = await fetch(url + "/api/v1/hosts/nope.example.test")
    assert [h["host"] for h in everything["hosts"]] == [spec.host for spec in SPECS]
    statuses = {h["host"]: h["status"] for h in everything["hosts"]}
    assert statuses == {
        "db.example.test": "Changed",
        "web.example.test": "Pending",
        "mail.example.test": "Stable",
        "192.0.2.50": "Unreachable",
        "new.example.test": "Unknown",
        "2001:db8::10": "Unknown",
    }
    host = db.json()
    assert host == everything["hosts"][0]
    assert host["address"] == "192.0.2.10" and host["baseline_source"] == "learned"
    assert host["open_ports"] == [22, 5432, 8080]
    assert host["last_scan"]["finished"] == NOW - 180 and host["last_scan"]["age_seconds"] == 180
    assert host["next_scan_in_seconds"] == 720
    port = next(p for p in host["ports"] if p["port"] == 8080)
    assert port["change"]["event"] == "PORT_NEW_OPEN"
    assert port["change"]["old_service"] is None
    assert port["change"]["new_service"]["product"] == HOSTILE.product
    assert port["identity"]["banner"] == HOSTILE.banner
    web = everything["hosts"][1]
    closing = next(p for p in web["ports"] if p["port"] == 443)
    assert closing["pending"]["change"] == "PORT_NOW_CLOSED"
    assert (closing["pending"]["count"], closing["pending"]["confirmations"]) == (1, 2)
    assert closing["identity"]["tls"]["sha256"] == "ab" * 32
    assert web["config"]["expected_open"] == [80, 443]
    assert v6.status == 200 and v6.json()["status"] == "Unknown"
    assert missing.status == 404
    assert missing.json() == {
        "status": "error",
        "errorType": "not_found",
        "error": "unknown host 'nope.example.test'",
    }


async def test_history_api(control: LabControl, registry: CollectorRegistry) -> None:
    async with serving(control, registry) as url:
        week = (await fetch(url + "/api/v1/history?host=db.example.test")).json()
        hour = (await fetch(url + "/api/v1/history?host=db.example.test&since=1h")).json()
        rfc3339 = (
            await fetch(url + "/api/v1/history?host=db.example.test&since=2025-12-29T07:50:00Z")
        ).json()
        unix = (
            await fetch(
                url + f"/api/v1/history?host=db.example.test&since={NOW - 7300:.0f}"
                f"&until={NOW - 3000:.0f}"
            )
        ).json()
        retired = await fetch(url + "/api/v1/history?host=retired.example.test")
        unknown = await fetch(url + "/api/v1/history?host=nope.example.test")
        no_host = await fetch(url + "/api/v1/history")
        bad_since = await fetch(url + "/api/v1/history?host=db.example.test&since=yesterday")
        reversed_range = await fetch(url + "/api/v1/history?host=db.example.test&since=1h&until=2h")
    assert week["host"] == "db.example.test" and week["until"] is None
    assert week["since"] == NOW - 7 * 86400
    assert [e["event"] for e in week["events"]] == ["BASELINE_LEARNED", "PORT_NEW_OPEN"]
    assert len(week["scans"]) == 3 and week["scans"][0]["duration_seconds"] == 2.0
    assert {(i["port"], i["service"]) for i in week["intervals"]} == {
        (22, "ssh"),
        (5432, "postgresql"),
        (8080, "http"),
    }
    assert [e["event"] for e in hour["events"]] == ["PORT_NEW_OPEN"]
    assert hour["events"][0]["port"] == 8080 and hour["events"][0]["severity"] == "high"
    assert rfc3339["since"] == NOW - 5400  # 2025-12-29T07:50:00Z
    assert [e["event"] for e in rfc3339["events"]] == ["PORT_NEW_OPEN"]
    assert [s["finished"] for s in unix["scans"]] == [NOW - 7200, NOW - 3600]
    assert retired.status == 200 and retired.json()["intervals"][0]["service"] == "ftp"
    assert unknown.status == 404 and unknown.json()["errorType"] == "not_found"
    assert no_host.status == 400 and no_host.json()["error"] == "missing parameter 'host'"
    assert bad_since.status == 400
    assert bad_since.json()["error"].startswith("invalid parameter 'since': 'yesterday' is not")
    assert reversed_range.status == 400 and "before" in reversed_range.json()["error"]


def test_fingerprints_are_split_back_into_fields() -> None:
    assert fingerprint_to_json(NGINX_TLS.fingerprint) == {
        "service": "https",
        "product": "nginx",
        "version": "1.24.0",
        "tls_sha256": "ab" * 32,
        "fingerprint": NGINX_TLS.fingerprint,
    }
    piped = ServiceIdentity("http", "Acme | Gateway", "2")
    assert fingerprint_to_json(piped.fingerprint) == {
        "service": "http",
        "product": "Acme | Gateway",
        "version": "2",
        "tls_sha256": None,
        "fingerprint": piped.fingerprint,
    }
    # Fields that once ran together come back as they were, not as a guess.
    for product, version in [("a|b", ""), ("a", "b|"), ('say "hi"\\', "|")]:
        identity = ServiceIdentity("http", product, version)
        fields = fingerprint_to_json(identity.fingerprint)
        assert fields is not None and (fields["product"], fields["version"]) == (product, version)
    assert describe_fingerprint(SSH.fingerprint) == "ssh OpenSSH 9.2p1"
    assert describe_fingerprint(NGINX_TLS.fingerprint) == "https nginx 1.24.0 (cert abababababab)"
    assert describe_fingerprint(None, missing="closed") == "closed"
    with pytest.raises(ValueError, match="not a service fingerprint"):
        fingerprint_to_json("http|Acme | Gateway|2|")


async def test_unknown_paths_are_404(control: LabControl, registry: CollectorRegistry) -> None:
    async with serving(control, registry) as url:
        page = await fetch(url + "/nothing/here")
        api = await fetch(url + "/api/v2/hosts")
    assert page.status == 404 and page.text == "404 page not found\n"
    assert api.status == 404 and api.json()["errorType"] == "not_found"


# --- baseline accept and basic auth ------------------------------------------------------------


def auth_config(tmp_path: Path, extra: str = "") -> WebConfig:
    path = tmp_path / "web.yml"
    path.write_text(
        "basic_auth_users:\n"
        f"  alice: {hash_password('correct horse')}\n"
        f"  bob: {hash_password('battery staple')}\n" + extra
    )
    return load_web_config(path)


ALICE = ("alice", "correct horse")


async def test_accept_is_forbidden_without_basic_auth(
    control: LabControl, registry: CollectorRegistry
) -> None:
    async with serving(control, registry) as url:
        answer = await fetch(
            url + "/api/v1/baseline/accept", "POST", json={"host": "db.example.test"}
        )
    assert answer.status == 403
    assert "basic_auth_users" in answer.json()["error"]
    assert "--web.config.file" in answer.json()["error"]
    assert control.lab.states["db.example.test"].in_force  # nothing was accepted


async def test_basic_auth_guards_every_endpoint(
    control: LabControl, registry: CollectorRegistry, tmp_path: Path
) -> None:
    config = auth_config(tmp_path, "auth_excluded_paths: [/-/healthy]\n")
    async with serving(control, registry, web_config=config) as url:
        answers = {
            "none": await fetch(url + "/metrics"),
            "wrong": await fetch(url + "/metrics", auth=("alice", "nope")),
            "other user's": await fetch(url + "/metrics", auth=("alice", "battery staple")),
            "unknown user": await fetch(url + "/metrics", auth=("mallory", "correct horse")),
            "garbage": await fetch(url + "/", headers={"Authorization": "Basic !!!"}),
            "bearer": await fetch(url + "/", headers={"Authorization": "Bearer x"}),
            "api": await fetch(url + "/api/v1/hosts"),
        }
        allowed = [
            await fetch(url + path, auth=ALICE)
            for path in ("/metrics", "/", "/api/v1/hosts", "/-/ready")
        ]
        bob = await fetch(url + "/metrics", auth=("bob", "battery staple"))
        healthy = await fetch(url + "/-/healthy")
    for name, answer in answers.items():
        assert answer.status == 401, name
        assert answer.headers["WWW-Authenticate"] == "Basic", name
        assert "portscan_" not in answer.text and "db.example.test" not in answer.text
    assert answers["api"].json()["errorType"] == "unauthorized"
    assert [a.status for a in allowed] == [200, 200, 200, 200]
    assert bob.status == 200
    assert healthy.status == 200  # excluded, as exporter-toolkit's auth_excluded_paths


async def test_accept_over_http(
    control: LabControl, registry: CollectorRegistry, tmp_path: Path
) -> None:
    config = auth_config(tmp_path)
    accept_url = "/api/v1/baseline/accept"
    async with serving(control, registry, web_config=config) as url:
        unauthenticated = await fetch(url + accept_url, "POST", json={"host": "db.example.test"})
        as_form = await fetch(
            url + accept_url, "POST", auth=ALICE, data={"host": "db.example.test"}
        )
        bad_json = await fetch(
            url + accept_url,
            "POST",
            auth=ALICE,
            data=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        bad_port = await fetch(
            url + accept_url, "POST", auth=ALICE, json={"host": "db.example.test", "port": "22"}
        )
        extra_field = await fetch(
            url + accept_url, "POST", auth=ALICE, json={"host": "db.example.test", "all": True}
        )
        unknown = await fetch(url + accept_url, "POST", auth=ALICE, json={"host": "nope"})
        expected_list = await fetch(
            url + accept_url, "POST", auth=ALICE, json={"host": "web.example.test"}
        )
        unknown_port = await fetch(
            url + accept_url, "POST", auth=ALICE, json={"host": "db.example.test", "port": 9}
        )
        accepted = await fetch(
            url + accept_url, "POST", auth=ALICE, json={"host": "db.example.test", "port": 8080}
        )
        after = (await fetch(url + "/api/v1/hosts/db.example.test", auth=ALICE)).json()
        history = (
            await fetch(url + "/api/v1/history?host=db.example.test&since=1m", auth=ALICE)
        ).json()
        get = await fetch(url + accept_url, auth=ALICE)
    assert unauthenticated.status == 401
    assert as_form.status == 415
    assert bad_json.status == 400 and bad_json.json()["error"] == "the body is not valid JSON"
    assert bad_port.status == 400 and "1-65535" in bad_port.json()["error"]
    assert extra_field.status == 400 and extra_field.json()["error"] == "unknown field(s): all"
    assert unknown.status == 404
    assert expected_list.status == 409
    assert expected_list.json() == {
        "status": "error",
        "errorType": "conflict",
        "error": "host web.example.test: its baseline is the expected-open list of the config;"
        " edit the list and reload instead",
    }
    assert unknown_port.status == 409
    assert unknown_port.json()["error"] == "host db.example.test: nothing known about port 9"
    assert accepted.status == 200
    body = accepted.json()
    assert body["host"] == "db.example.test" and body["status"] == "Stable"
    assert body["changes_in_force"] == 0
    assert next(p for p in body["ports"] if p["port"] == 8080)["expected"] is True
    assert after == body
    assert [(e["event"], e["port"]) for e in history["events"]] == [("BASELINE_ACCEPTED", 8080)]
    assert get.status == 405
    # The store holds the accepted baseline: a fresh read agrees with what was answered.
    stored = control.lab.store.load_state("db.example.test")
    assert stored is not None and 8080 in stored.baseline and not stored.in_force


async def test_configured_headers_and_rate_limit(
    control: LabControl, registry: CollectorRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        "http_server_config:\n"
        "  headers:\n"
        "    X-Frame-Options: deny\n"
        "    Content-Security-Policy: default-src 'self'\n"
        "rate_limit:\n"
        "  interval: 1h\n"
        "  burst: 3\n"
    )
    async with serving(control, registry, web_config=load_web_config(path)) as url:
        answers = [await fetch(url + "/") for _ in range(4)]
        missing = await fetch(url + "/missing")
    assert [a.status for a in answers] == [200, 200, 200, 429]
    for answer in (*answers, missing):
        assert answer.headers["X-Frame-Options"] == "deny"
    assert answers[0].headers["Content-Security-Policy"] == "default-src 'self'"


async def test_web_config_changes_apply_to_the_next_request(
    control: LabControl, registry: CollectorRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "web.yml"
    path.write_text("")
    async with serving(control, registry, web_config=load_web_config(path)) as url:
        before = await fetch(url + "/metrics")
        path.write_text(f"basic_auth_users:\n  alice: {hash_password('correct horse')}\n")
        locked = await fetch(url + "/metrics")
        unlocked = await fetch(url + "/metrics", auth=ALICE)
        path.write_text("basic_auth_users:\n  alice: plain-text\n")
        broken = await fetch(url + "/metrics", auth=ALICE)
        path.write_text("")
        fixed = await fetch(url + "/metrics")
    assert before.status == 200
    assert locked.status == 401 and unlocked.status == 200
    assert broken.status == 500 and "plain-text" not in broken.text
    assert fixed.status == 200


# --- TLS ---------------------------------------------------------------------------------------


def client_context(trust: Path, *, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(trust))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def tls_config(tmp_path: Path, extra: str = "") -> WebConfig:
    path = tmp_path / "web.yml"
    path.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n" + extra)
    return load_web_config(path)


@requires_openssl
async def test_tls(control: LabControl, registry: CollectorRegistry, tmp_path: Path) -> None:
    server_cert, _ = make_cert(tmp_path, "server")
    other_cert, _ = make_cert(tmp_path, "other")
    config = tls_config(tmp_path, "  min_version: TLS13\n")
    async with serving(control, registry, web_config=config) as url:
        assert url.startswith("https://")
        answer = await fetch(url + "/metrics", ssl_context=client_context(server_cert))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await fetch(url + "/metrics", ssl_context=client_context(other_cert))
        old_client = client_context(server_cert)
        old_client.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(aiohttp.ClientError):
            await fetch(url + "/metrics", ssl_context=old_client)
        with pytest.raises(aiohttp.ClientError):
            await fetch(url.replace("https://", "http://") + "/metrics")
    assert answer.status == 200
    assert 'portscan_port_open{host="db.example.test",port="22",protocol="tcp"} 1\n' in answer.text


@requires_openssl
async def test_tls_with_basic_auth(
    control: LabControl, registry: CollectorRegistry, tmp_path: Path
) -> None:
    server_cert, _ = make_cert(tmp_path, "server")
    tls_config(tmp_path)
    path = tmp_path / "web.yml"
    path.write_text(
        path.read_text() + f"basic_auth_users:\n  alice: {hash_password('correct horse')}\n"
    )
    config = load_web_config(path)
    trust = client_context(server_cert)
    async with serving(control, registry, web_config=config) as url:
        denied = await fetch(url + "/", ssl_context=trust)
        allowed = await fetch(url + "/", ssl_context=trust, auth=ALICE)
    assert (denied.status, allowed.status) == (401, 200)


@requires_openssl
async def test_client_certificates(
    control: LabControl, registry: CollectorRegistry, tmp_path: Path
) -> None:
    server_cert, _ = make_cert(tmp_path, "server")
    scraper = make_cert(tmp_path, "scraper", cn="prometheus")
    stranger = make_cert(tmp_path, "stranger", cn="stranger")
    config = tls_config(
        tmp_path, "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: scraper.crt\n"
    )
    async with serving(control, registry, web_config=config) as url:
        trusted = await fetch(
            url + "/metrics", ssl_context=client_context(server_cert, cert=scraper)
        )
        for client in (client_context(server_cert), client_context(server_cert, cert=stranger)):
            with pytest.raises(aiohttp.ClientError):
                await fetch(url + "/metrics", ssl_context=client)
    assert trusted.status == 200


@requires_openssl
async def test_client_allowed_sans(
    control: LabControl, registry: CollectorRegistry, tmp_path: Path
) -> None:
    server_cert, _ = make_cert(tmp_path, "server")
    scraper = make_cert(tmp_path, "scraper", san="DNS:prometheus.example.org,IP:2001:db8::5")
    other = make_cert(tmp_path, "other", san="DNS:grafana.example.org")
    bundle = tmp_path / "clients.crt"
    bundle.write_text(scraper[0].read_text() + other[0].read_text())
    config = tls_config(
        tmp_path,
        "  client_auth_type: RequireAndVerifyClientCert\n"
        "  client_ca_file: clients.crt\n"
        "  client_allowed_sans: [2001:db8::5]\n",
    )
    async with serving(control, registry, web_config=config) as url:
        by_ip = await fetch(url + "/metrics", ssl_context=client_context(server_cert, cert=scraper))
        refused = await fetch(url + "/metrics", ssl_context=client_context(server_cert, cert=other))
        # The list is read per request: a change applies without a restart.
        web = tmp_path / "web.yml"
        web.write_text(web.read_text().replace("[2001:db8::5]", "[grafana.example.org]"))
        by_name = await fetch(url + "/metrics", ssl_context=client_context(server_cert, cert=other))
    assert by_ip.status == 200
    assert refused.status == 403 and refused.text == "client certificate not allowed (SAN)\n"
    assert by_name.status == 200


@requires_openssl
async def test_a_renewed_certificate_is_served_without_restart(
    control: LabControl, registry: CollectorRegistry, tmp_path: Path
) -> None:
    first, _ = make_cert(tmp_path, "server", cn="first")
    config = tls_config(tmp_path)
    renewed_dir = tmp_path / "renewed"
    renewed_dir.mkdir()
    renewed, renewed_key = make_cert(renewed_dir, "server", cn="renewed")
    trust_first = client_context(first)
    trust_renewed = client_context(renewed)
    async with serving(control, registry, web_config=config) as url:
        before = await fetch(url + "/-/healthy", ssl_context=trust_first)
        # As certbot and cert-manager do: new files moved into place.
        os.replace(renewed_key, tmp_path / "server.key")
        os.replace(renewed, tmp_path / "server.crt")
        after = await fetch(url + "/-/healthy", ssl_context=trust_renewed)
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await fetch(url + "/-/healthy", ssl_context=trust_first)
    assert (before.status, after.status) == (200, 200)


@requires_openssl
async def test_tls_handshakes_fail_closed_while_the_web_config_is_broken(
    control: LabControl, registry: CollectorRegistry, tmp_path: Path
) -> None:
    server_cert, _ = make_cert(tmp_path, "server")
    config = tls_config(tmp_path)
    trust = client_context(server_cert)
    async with serving(control, registry, web_config=config) as url:
        (tmp_path / "web.yml").write_text("tls_server_config:\n  cert_file: missing.crt\n")
        with pytest.raises(aiohttp.ClientError):
            await fetch(url + "/-/healthy", ssl_context=trust)
        tls_config(tmp_path)  # repaired
        repaired = await fetch(url + "/-/healthy", ssl_context=trust)
    assert repaired.status == 200


# --- listening ---------------------------------------------------------------------------------


def test_parse_listen_address() -> None:
    assert parse_listen_address(":9678") == (None, 9678)
    assert parse_listen_address("0.0.0.0:9678") == ("0.0.0.0", 9678)
    assert parse_listen_address("[::]:9678") == ("::", 9678)
    assert parse_listen_address("[::1]:0") == ("::1", 0)
    assert parse_listen_address("localhost:80") == ("localhost", 80)
    for bad in ("9678", "host:", "host:http", ":70000", "::1:9678", ""):
        with pytest.raises(ListenError) as caught:
            parse_listen_address(bad)
        assert caught.value.errno == errno.EINVAL
        assert str(caught.value).startswith(f"invalid listen address {bad!r}")


async def test_address_in_use_is_a_clear_oserror(
    control: LabControl, registry: CollectorRegistry
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = build_app(control, exposition(control, registry))
        with pytest.raises(OSError) as caught:
            await start_server(app, f"127.0.0.1:{port}", None)
    assert caught.value.errno == errno.EADDRINUSE
    assert str(caught.value) == (
        f"cannot listen on 127.0.0.1:{port}: the address is already in use"
        " (is another exporter running?)"
    )


async def test_an_unloadable_certificate_is_a_clear_oserror(
    control: LabControl, registry: CollectorRegistry, tmp_path: Path
) -> None:
    missing = tmp_path / "gone.crt"
    config = WebConfig(tls_server_config=TLSServerConfig(cert_file=missing, key_file=missing))
    app = build_app(control, exposition(control, registry), web_config=config)
    with pytest.raises(OSError) as caught:
        await start_server(app, "127.0.0.1:0", config)
    assert str(caught.value) == (
        "cannot serve TLS on 127.0.0.1:0: <web config>: tls_server_config.cert_file:"
        f" cannot read {missing}: No such file or directory"
    )


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::", 0))
    except OSError:
        return False
    return True


async def test_any_address_listens_on_one_port_for_both_families(
    control: LabControl, registry: CollectorRegistry
) -> None:
    app = build_app(control, exposition(control, registry), clock=lambda: NOW)
    runner = await start_server(app, ":0", None)
    try:
        addresses = runner.addresses
        assert len(addresses) == 1
        if _ipv6_available():
            assert addresses[0][0] == "::"
        answer = await fetch(f"http://127.0.0.1:{addresses[0][1]}/-/healthy")
        assert answer.status == 200
    finally:
        await runner.cleanup()


def test_telemetry_path_must_be_absolute(control: LabControl, registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        build_app(control, exposition(control, registry), telemetry_path="metrics")


def test_the_hosts_document_is_what_encoding_every_host_anew_gives(
    lab: Lab, control: LabControl
) -> None:
    """/api/v1/hosts keeps each host's text while its view is the same object: whatever the
    time of the request, a view replaced, or a banner that reads like the document's own
    stand-ins, the body is byte for byte `json.dumps` of every host encoded anew."""
    document = HostsDocument()

    def expected(views: tuple[HostView, ...], now: float) -> bytes:
        return json.dumps({"hosts": [host_to_json(view, now) for view in views]}).encode()

    views = control.snapshot.hosts
    assert any(view.state.last_scan is None for view in views)  # never scanned: no age
    for now in (NOW, NOW + 0.25, NOW + 86400.5, NOW - 1e6):
        assert document.render(views, now) == expected(views, now)
    # One host scanned again, with a banner that is exactly the age stand-in's text.
    lab.scan("mail.example.test", 10, {25: ServiceIdentity("smtp", banner="\0age\0")})
    control.publish()
    changed = control.snapshot.hosts
    assert document.render(changed, NOW + 7) == expected(changed, NOW + 7)
    assert document.render(views, NOW + 9) == expected(views, NOW + 9)
    assert document.render((), NOW) == b'{"hosts": []}'
