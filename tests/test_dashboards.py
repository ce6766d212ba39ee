"""The Grafana dashboards: structure, and every PromQL expression run against a real Prometheus.

The Prometheus (Debian package `prometheus`) scrapes a small HTTP endpoint of this test that
serves a fixed exposition shaped like the exporter's: six hosts, one in each situation the
dashboards and alerts distinguish. It also loads the shipped alerting rules, so the same run
proves that every rule evaluates without error on exporter-shaped series and fires exactly
where it should. No Grafana is needed: template variables are substituted the way Grafana does.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prometheus_lab import Prom, missing_binaries_reason, run_prometheus, wait_for
from tests.test_metrics_exposition import exposed_families

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = ROOT / "grafana" / "provisioning"
RULES = ROOT / "alerting-rules" / "portscan.rules.yml"
DS = {"type": "prometheus", "uid": "${datasource}"}
HOST_QUERY = "label_values(portscan_scan_success, host)"
BUILTIN_VARS = {"__interval", "__interval_ms", "__rate_interval", "__range", "__range_s"}
BUILTIN_VARS |= {"__range_ms", "__from", "__to", "__dashboard", "__org", "__user", "__name"}
BUILTIN_VARS |= {"__value", "__data", "__field", "__series", "__url_time_range", "__all"}
SCRAPE_INTERVAL = 1


def _load(path: Path) -> dict[str, Any]:
    model: dict[str, Any] = json.loads(path.read_text())
    return model


def _panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in model["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep theirs inside


def _by_uid(uid: str) -> dict[str, Any]:
    return next(m for m in map(_load, DASHBOARDS) if m["uid"] == uid)


def _variables(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in model["templating"]["list"]}


def _variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else str(query)


# --- structure --------------------------------------------------------------------------------


def test_both_dashboards_exist_with_stable_unique_uids() -> None:
    models = [_load(path) for path in DASHBOARDS]
    uids = [m["uid"] for m in models]
    assert sorted(uids) == ["portscan-host", "portscan-overview"]
    assert len({m["title"] for m in models}) == len(models)
    for model in models:
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", model["uid"])
        assert isinstance(model["schemaVersion"], int) and model["schemaVersion"] >= 36
        assert model["id"] is None, "an id would clash with the importing Grafana's own"
        assert "portscan" in model["tags"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_panels_are_well_formed(path: Path) -> None:
    model = _load(path)
    panels = list(_panels(model))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["title"], panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DS, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        targets = panel["targets"]
        assert targets, panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for t in targets:
            assert t["datasource"] == DS, (panel["title"], t["refId"])
            assert t["expr"].strip(), (panel["title"], t["refId"])
        if panel["type"] == "table":
            for t in targets:
                assert t["instant"] is True and t.get("range") is False, (
                    panel["title"],
                    t["refId"],
                )
                assert t["format"] == "table", (panel["title"], t["refId"])
            _check_table_fields(panel)


def _check_table_fields(panel: dict[str, Any]) -> None:
    """Renames and overrides must name columns the queries produce, or they silently do nothing."""
    columns = {f"Value #{t['refId']}" for t in panel["targets"]} | {"Time"}
    for t in panel["targets"]:
        columns |= set(
            re.findall(r"\b(?:by|on) \(([^)]*)\)", t["expr"])[0].replace(" ", "").split(",")
        )
    columns.discard("__name__")
    (organize,) = [t["options"] for t in panel["transformations"] if t["id"] == "organize"]
    for key in ("renameByName", "indexByName", "excludeByName"):
        assert set(organize[key]) <= columns, (panel["title"], key, set(organize[key]) - columns)
    displayed = {organize["renameByName"].get(c, c) for c in columns}
    for override in panel["fieldConfig"]["overrides"]:
        assert override["matcher"]["options"] in displayed, (panel["title"], override["matcher"])
    for sort in panel["options"].get("sortBy", []):
        assert sort["displayName"] in displayed, panel["title"]
    assert panel["transformations"][0]["id"] == "merge", "one row per key across the queries"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_no_hard_coded_datasource_anywhere(path: Path) -> None:
    model = _load(path)
    variables = _variables(model)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    host = variables["host"]
    assert host["type"] == "query" and host["datasource"] == DS
    assert _variable_query(host) == HOST_QUERY

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "datasource" in node and node.get("builtIn") != 1:
                assert node["datasource"] == DS, f"{where}: {node['datasource']}"
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(model, path.stem)
    assert "__inputs" not in model, "import-time datasource inputs break provisioning"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_variable_used_is_defined(path: Path) -> None:
    model = _load(path)
    defined = set(_variables(model)) | BUILTIN_VARS
    for expr in (e for _, e, _ in _expressions(model)):
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in defined, (name, expr)


def test_overview_has_the_host_table_and_fleet_counts() -> None:
    model = _by_uid("portscan-overview")
    titles = {p["title"]: p for p in _panels(model)}
    assert titles["Hosts"]["type"] == "table"
    for name in (
        "Unexpected open ports",
        "Expected ports closed",
        "Services changed",
        "Pending changes",
    ):
        assert titles[name]["type"] == "stat"
    status = titles["Hosts"]["fieldConfig"]["overrides"]
    mapped = next(o for o in status if o["matcher"]["options"] == "Status")["properties"]
    texts = {
        v["text"]
        for p in mapped
        if p["id"] == "mappings"
        for v in p["value"][0]["options"].values()
    }
    assert texts == {"Stable", "Changed", "Pending", "Unreachable"}
    variables = _variables(model)
    assert variables["host"]["multi"] and variables["host"]["includeAll"]


def test_host_dashboard_has_port_timeline_and_change_annotations() -> None:
    model = _by_uid("portscan-host")
    panels = list(_panels(model))
    timeline = next(p for p in panels if p["title"] == "Port states")
    assert timeline["type"] == "state-timeline"
    assert all(not t["instant"] for t in timeline["targets"])
    assert "{{port}}" in timeline["targets"][0]["legendFormat"]
    assert any(p["type"] == "table" and p["title"] == "Service identity" for p in panels)
    changes = next(
        a for a in model["annotations"]["list"] if a.get("name") == "Confirmed port changes"
    )
    # Grafana reads a value used as the time in milliseconds.
    assert changes["useValueForTime"] and changes["expr"].endswith("* 1000")
    assert not _variables(model)["host"]["multi"]


def test_provisioning_files_load_the_dashboards() -> None:
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "portscan.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    docs = (ROOT / "docs" / "prometheus.md").read_text()
    assert f"grafana/dashboards:{path}" in docs, "docs mount the dashboards elsewhere"
    assert "grafana/provisioning:/etc/grafana/provisioning" in docs
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert sources["apiVersion"] == 1
    assert [s["type"] for s in sources["datasources"]] == ["prometheus"]


# --- the exporter-shaped series ---------------------------------------------------------------

STATE_CODE = {"unexpected_open": 5, "expected_closed": 4, "service_changed": 3}
STATUS_CODE = {"Stable": 0, "Pending": 1, "Changed": 2, "Unreachable": 3}
CHANGES = ("PORT_NEW_OPEN", "PORT_NOW_CLOSED", "PORT_SERVICE_CHANGED", "RETURN_TO_BASELINE")
DAY = 86400.0


@dataclass(frozen=True)
class FixturePort:
    port: int
    open: bool
    expected: bool
    service: tuple[str, str, str] | None = None  # service, product, version; open ports only
    in_force: str | None = None  # which confirmed-change gauge is 1
    pending: str | None = None  # the `change` label of a pending change
    tls_days: float | None = None  # certificate expiry, days from now
    changed_days_ago: float = 30.0

    @property
    def state(self) -> int:
        if self.in_force is not None:
            return STATE_CODE[self.in_force]
        if self.pending is not None:
            return 2
        return int(self.open)


@dataclass(frozen=True)
class FixtureHost:
    host: str
    status: str  # what the overview's Status column must say
    ports: tuple[FixturePort, ...]
    success: bool = True
    last_scan_ago: float = 600.0
    interval: float = 3600.0


SSH = ("ssh", "OpenSSH", "9.2p1")
FLEET = (
    FixtureHost(
        "web-1.example.net",
        "Stable",
        (
            FixturePort(22, True, True, SSH),
            FixturePort(443, True, True, ("https", "nginx", "1.22.1"), tls_days=60),
        ),
    ),
    FixtureHost(
        "db-1.example.net",
        "Changed",
        (
            FixturePort(5432, True, True, ("postgresql", "PostgreSQL", "15.5")),
            # Seen closed once since: a return to baseline waits for confirmation.
            FixturePort(
                3306,
                True,
                False,
                ("mysql", "MariaDB", "10.11.6"),
                "unexpected_open",
                "RETURN_TO_BASELINE",
                changed_days_ago=1,
            ),
        ),
    ),
    FixtureHost(
        "mail-1.example.net",
        "Changed",
        (
            FixturePort(25, False, True, None, "expected_closed", changed_days_ago=0.5),
            FixturePort(143, True, True, ("imap", "Dovecot imapd", ""), "service_changed"),
            FixturePort(993, True, True, ("imaps", "Dovecot imapd", ""), tls_days=5),
            FixturePort(110, False, False, None, None, "PORT_NEW_OPEN"),
        ),
    ),
    FixtureHost(
        "app-1.example.net",
        "Pending",
        (
            FixturePort(8080, True, True, ("http", "Jetty", "9.4.53")),
            FixturePort(9200, False, False, None, None, "PORT_NEW_OPEN"),
        ),
    ),
    FixtureHost("10.0.0.7", "Unreachable", (FixturePort(22, True, True, SSH),), success=False),
    FixtureHost(
        "backup-1.example.net",
        "Stable",
        (FixturePort(22, True, True, SSH),),
        last_scan_ago=10 * 3600,
    ),
)
# Per alert: (host, port) pairs the fleet above must make fire, and nothing else.
EXPECTED_ALERTS = {
    ("PortscanUnexpectedPortOpen", "db-1.example.net", "3306"),
    ("PortscanExpectedPortClosed", "mail-1.example.net", "25"),
    ("PortscanServiceChanged", "mail-1.example.net", "143"),
    ("PortscanHostUnreachable", "10.0.0.7", None),
    ("PortscanScanStale", "backup-1.example.net", None),
    ("PortscanTLSCertificateExpiringSoon", "mail-1.example.net", "993"),
}


class _Exposition:
    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_: str, labels: dict[str, str], value: float) -> None:
        samples = self.families.setdefault(name, (kind, help_, []))[2]
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        samples.append(f"{name}{{{text}}} {value!r}" if text else f"{name} {value!r}")

    def render(self) -> str:
        lines = []
        for name, (kind, help_, samples) in self.families.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def fleet_exposition(now: float) -> str:
    """What the exporter would expose for FLEET at wall-clock time `now`."""
    out = _Exposition()
    gauge = "gauge"
    for h in FLEET:
        host = {"host": h.host}
        last = now - h.last_scan_ago
        out.add(
            "portscan_scan_success",
            gauge,
            "Last scan completed and the host answered.",
            host,
            float(h.success),
        )
        out.add(
            "portscan_last_scan_timestamp_seconds",
            gauge,
            "End of the last completed scan.",
            host,
            last,
        )
        out.add(
            "portscan_last_scan_duration_seconds", gauge, "Duration of the last scan.", host, 12.5
        )
        out.add(
            "portscan_next_scan_timestamp_seconds",
            gauge,
            "When the next scan is due.",
            host,
            last + h.interval,
        )
        out.add("portscan_ports_scanned", gauge, "Ports probed in the last scan.", host, 1000.0)
        if h.ports:
            out.add(
                "portscan_confirmations_required",
                gauge,
                "Consecutive scans that confirm a change.",
                host,
                2.0,
            )
        for result, count in (("success", 40.0), ("failure", 2.0)):
            out.add(
                "portscan_scans_total",
                "counter",
                "Scans finished.",
                host | {"result": result},
                count,
            )
        for p in h.ports:
            port = host | {"port": str(p.port), "protocol": "tcp"}
            out.add(
                "portscan_port_open", gauge, "Confirmed state of the port.", port, float(p.open)
            )
            out.add(
                "portscan_port_expected", gauge, "Port is in the baseline.", port, float(p.expected)
            )
            for kind in STATE_CODE:
                out.add(
                    f"portscan_port_{kind}",
                    gauge,
                    f"Confirmed change in force ({kind}).",
                    port,
                    float(p.in_force == kind),
                )
            # Only while a change is pending, and only for its kind.
            if p.pending is not None:
                assert p.pending in CHANGES, p.pending
                out.add(
                    "portscan_port_change_pending",
                    gauge,
                    "A change seen, not yet confirmed.",
                    port | {"change": p.pending},
                    1.0,
                )
            out.add(
                "portscan_port_last_change_timestamp_seconds",
                gauge,
                "When the confirmed state last changed.",
                port,
                now - p.changed_days_ago * DAY,
            )
            if p.service is not None and p.open:
                service, product, version = p.service
                out.add(
                    "portscan_port_service_info",
                    gauge,
                    "Current identification.",
                    port | {"service": service, "product": product, "version": version},
                    1.0,
                )
            if p.tls_days is not None and p.open:
                out.add(
                    "portscan_port_tls_cert_expiry_timestamp_seconds",
                    gauge,
                    "Expiry of the TLS certificate served on the port.",
                    port,
                    now + p.tls_days * DAY,
                )
    out.add("portscan_config_last_reload_successful", gauge, "Last reload succeeded.", {}, 1.0)
    out.add(
        "portscan_config_last_reload_success_timestamp_seconds",
        gauge,
        "Last successful reload.",
        {},
        now - DAY,
    )
    out.add("portscan_build_info", gauge, "Build information.", {"version": "0.1.0"}, 1.0)
    return out.render()


def _metric_names(expr: str) -> set[str]:
    """The portscan_* metrics an expression reads; a __name__ regex must match one or more."""
    exposed = exposed_families()
    for pattern in re.findall(r'__name__=~"([^"]+)"', expr):
        assert any(re.fullmatch(pattern, name) for name in exposed), pattern
    expr = re.sub(r'__name__=~"[^"]+"', "", expr)
    return set(re.findall(r"\bportscan_[a-z0-9_]+", expr))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboards_read_only_what_the_exporter_exposes(path: Path) -> None:
    exposed = exposed_families()
    for where, expr, _ in _expressions(_load(path)):
        assert _metric_names(expr) <= exposed, (where, _metric_names(expr) - exposed)
    # The hosts the variable lists: every host scanned, with or without open ports.
    assert _metric_names(HOST_QUERY) <= exposed


def test_fixture_exposition_is_shaped_like_the_exporters() -> None:
    families = set(re.findall(r"^# TYPE (\S+) ", fleet_exposition(time.time()), re.MULTILINE))
    assert families <= exposed_families(), families - exposed_families()


def test_fixture_exposition_passes_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    text = fleet_exposition(time.time())
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stderr


# --- a real Prometheus --------------------------------------------------------------------------


class _MetricsHandler(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prom]:
    reason = missing_binaries_reason()
    if reason is not None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("prometheus")
    handler = type("Handler", (_MetricsHandler,), {"body": fleet_exposition(time.time()).encode()})
    exporter = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL}s",
        },
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "portscan",
                "static_configs": [{"targets": [f"127.0.0.1:{exporter.server_address[1]}"]}],
            }
        ],
    }
    try:
        with run_prometheus(tmp, config) as prom:
            # Range queries and rates want a few samples, and the rules one evaluation after them.
            wait_for(
                "three scrapes",
                lambda: bool(prom.query('count_over_time(up{job="portscan"}[1m]) >= 3')),
            )
            yield prom
    finally:
        exporter.shutdown()
        exporter.server_close()


def _expressions(model: dict[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(where, expression, instant) for every panel target and every annotation query."""
    for panel in _panels(model):
        for t in panel.get("targets", []):
            yield f"{panel['title']}/{t['refId']}", t["expr"], bool(t.get("instant"))
    for annotation in model["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']}", annotation["expr"], False


def _substitute(expr: str, values: dict[str, str]) -> str:
    """Template variables as Grafana interpolates them into a PromQL query."""
    builtins = {
        "__interval": f"{2 * SCRAPE_INTERVAL}s",
        "__rate_interval": f"{4 * SCRAPE_INTERVAL}s",
        "__range": "60s",
        "__range_s": "60",
    }
    table = builtins | values

    def replace(match: re.Match[str]) -> str:
        return table[match.group(1) or match.group(2)]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", replace, expr)
    assert "$" not in out, out
    return out


def _run(prom: Prom, expr: str, instant: bool) -> list[dict[str, Any]]:
    return prom.query(expr) if instant else prom.query_range(expr, 60)


def _regex(hosts: list[str]) -> str:
    """A multi-value selection the way Grafana formats it for a regex matcher: regex
    metacharacters escaped, and the backslash doubled for the PromQL string literal."""
    escaped = (re.sub(r"([][$^*+?.(){}|\\])", r"\\\1", h) for h in hosts)
    return "(" + "|".join(e.replace("\\", "\\\\") for e in escaped) + ")"


def test_every_overview_expression_returns_data(prometheus: Prom) -> None:
    model = _by_uid("portscan-overview")
    for selection in (".*", _regex([FLEET[0].host, FLEET[2].host])):
        for where, expr, instant in _expressions(model):
            result = _run(prometheus, _substitute(expr, {"host": selection}), instant)
            assert result, f"{where} returned nothing for host=~{selection!r}"


def test_overview_host_table_has_one_row_per_host_with_its_status(prometheus: Prom) -> None:
    model = _by_uid("portscan-overview")
    table = next(p for p in _panels(model) if p["title"] == "Hosts")
    every = {h.host for h in FLEET}
    for t in table["targets"]:
        rows = prometheus.query(_substitute(t["expr"], {"host": ".*"}))
        hosts = [r["metric"]["host"] for r in rows]
        assert sorted(hosts) == sorted(every), (t["refId"], hosts)
        assert all(set(r["metric"]) == {"host"} for r in rows), t["refId"]
    status = next(t for t in table["targets"] if t["refId"] == "A")
    rows = prometheus.query(_substitute(status["expr"], {"host": ".*"}))
    got = {r["metric"]["host"]: float(r["value"][1]) for r in rows}
    assert got == {h.host: STATUS_CODE[h.status] for h in FLEET}
    selected = _regex([FLEET[0].host, FLEET[3].host])
    assert len(prometheus.query(_substitute(status["expr"], {"host": selected}))) == 2


def test_overview_counts_and_port_states(prometheus: Prom) -> None:
    model = _by_uid("portscan-overview")
    panels = {p["title"]: p for p in _panels(model)}

    def single(title: str) -> float:
        (row,) = prometheus.query(_substitute(panels[title]["targets"][0]["expr"], {"host": ".*"}))
        return float(row["value"][1])

    ports = [p for h in FLEET for p in h.ports]
    assert single("Hosts scanned") == len(FLEET)
    assert single("Unreachable") == sum(not h.success for h in FLEET)
    assert single("Unexpected open ports") == sum(p.in_force == "unexpected_open" for p in ports)
    assert single("Expected ports closed") == sum(p.in_force == "expected_closed" for p in ports)
    assert single("Services changed") == sum(p.in_force == "service_changed" for p in ports)
    assert single("Pending changes") == sum(p.pending is not None for p in ports)
    assert single("TLS certs < 14 days") == 1
    state = next(t for t in panels["Ports"]["targets"] if t["refId"] == "A")
    rows = prometheus.query(_substitute(state["expr"], {"host": ".*"}))
    got = {(r["metric"]["host"], int(r["metric"]["port"])): float(r["value"][1]) for r in rows}
    assert got == {(h.host, p.port): p.state for h in FLEET for p in h.ports}


def test_every_host_dashboard_expression_runs_for_every_host(prometheus: Prom) -> None:
    model = _by_uid("portscan-host")
    for h in FLEET:
        # Queries that are empty by design for this host; everything else must have data.
        empty_ok = set()
        if all(p.tls_days is None for p in h.ports):
            empty_ok.add("Service identity/E")
        if h.success:
            empty_ok.add("annotation Host unreachable")
        for where, expr, instant in _expressions(model):
            result = _run(prometheus, _substitute(expr, {"host": h.host}), instant)
            assert bool(result) or where in empty_ok, f"{where} returned nothing for {h.host}"
            if where in empty_ok:
                assert not result, f"{where} returned data for {h.host}"


def test_host_timeline_has_one_row_per_port_in_its_state(prometheus: Prom) -> None:
    model = _by_uid("portscan-host")
    timeline = next(p for p in _panels(model) if p["title"] == "Port states")
    for h in FLEET:
        rows = prometheus.query_range(
            _substitute(timeline["targets"][0]["expr"], {"host": h.host}), 60
        )
        got = {int(r["metric"]["port"]): {float(v) for _, v in r["values"]} for r in rows}
        assert got == {p.port: {float(p.state)} for p in h.ports}, h.host


def test_change_annotations_sit_at_the_confirmation_time(prometheus: Prom) -> None:
    model = _by_uid("portscan-host")
    ann = next(a for a in model["annotations"]["list"] if a.get("name") == "Confirmed port changes")
    host = FLEET[2]
    rows = prometheus.query_range(_substitute(ann["expr"], {"host": host.host}), 60)
    when = {int(r["metric"]["port"]): float(r["values"][-1][1]) / 1000 for r in rows}
    now = time.time()
    for p in host.ports:
        # The fixture's timestamps were computed when the module's Prometheus started.
        assert abs(now - when[p.port] - p.changed_days_ago * DAY) < 300, p.port


def test_rules_evaluate_cleanly_and_fire_where_expected(prometheus: Prom) -> None:
    def firing() -> set[tuple[str, str, str | None]]:
        alerts = prometheus.get("/api/v1/alerts")["alerts"]
        return {
            (a["labels"]["alertname"], a["labels"].get("host", ""), a["labels"].get("port"))
            for a in alerts
            if a["state"] == "firing"
        }

    wait_for("the alerts", lambda: firing() >= EXPECTED_ALERTS, seconds=20)
    assert firing() == EXPECTED_ALERTS
    groups = prometheus.get("/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(yaml.safe_load(RULES.read_text())["groups"][0]["rules"])
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), (rule["name"], rule)
    unexpected = next(
        a
        for a in prometheus.get("/api/v1/alerts")["alerts"]
        if a["labels"]["alertname"] == "PortscanUnexpectedPortOpen"
    )
    assert unexpected["labels"]["service"] == "mysql"
    assert "Service: mysql (MariaDB 10.11.6)." in unexpected["annotations"]["description"]
