"""The shipped alerting rules, their promtool unit tests, the Alertmanager example and the runbook.

The binaries are the real ones (Debian packages `prometheus` for promtool, and
`prometheus-alertmanager` for amtool and the daemon); a test skips when its binary is missing.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import unicodedata
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "alerting-rules"
RULES = RULES_DIR / "portscan.rules.yml"
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
AM_EXAMPLE = RULES_DIR / "alertmanager.example.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"

# The alerts contract of DESIGN.md: name -> (severity, event) where the contract fixes them.
CONTRACT: dict[str, tuple[str, str] | None] = {
    "PortscanUnexpectedPortOpen": ("critical", "PORT_NEW_OPEN"),
    "PortscanExpectedPortClosed": ("warning", "PORT_NOW_CLOSED"),
    "PortscanServiceChanged": ("warning", "PORT_SERVICE_CHANGED"),
    "PortscanHostUnreachable": None,
    "PortscanScanStale": None,
    "PortscanConfigReloadFailed": None,
}
PORT_ALERTS = {"PortscanUnexpectedPortOpen", "PortscanExpectedPortClosed", "PortscanServiceChanged"}
RECEIVER_FOR_SEVERITY = {"critical": "portscan-oncall", "warning": "portscan-ticket"}


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip(
        f"`{names[0]}` not installed (Debian package for it: see tests/debian-packages.txt)"
    )


def _promtool() -> str:
    return _binary("promtool")


def _amtool() -> str:
    return _binary("amtool")


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def _github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub generates for the headings of a Markdown file, plus explicit ids."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or match is None:
            continue
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).lower()
        slug = "".join(
            c
            for c in text
            if c in "-_ " or unicodedata.category(c)[0] in "LN"  # letters and numbers
        ).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    anchors.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", markdown))
    return anchors


# --- promtool / amtool -------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = _run(_promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests() -> None:
    assert RULE_TESTS, "no promtool unit tests in alerting-rules/tests/"
    result = _run(_promtool(), "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_amtool_check_config() -> None:
    result = _run(_amtool(), "check-config", str(AM_EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_routes_to_the_receiver_of_its_severity() -> None:
    amtool = _amtool()
    for rule in _alert_rules():
        severity = rule["labels"]["severity"]
        labels = [f"alertname={rule['alert']}", f"severity={severity}", "host=web-1.example.net"]
        result = _run(
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={AM_EXAMPLE}",
            f"--verify.receivers={RECEIVER_FOR_SEVERITY[severity]}",
            *labels,
        )
        assert result.returncode == 0, (rule["alert"], result.stdout, result.stderr)


# --- rule structure ---------------------------------------------------------------------------


def test_alerts_follow_the_contract() -> None:
    rules = {rule["alert"]: rule for rule in _alert_rules()}
    assert set(CONTRACT) <= set(rules), set(CONTRACT) - set(rules)
    assert any(
        "portscan_port_tls_cert_expiry_timestamp_seconds" in rule["expr"] for rule in rules.values()
    ), "no TLS certificate expiry alert"
    for name, fixed in CONTRACT.items():
        if fixed is not None:
            assert (rules[name]["labels"]["severity"], rules[name]["labels"]["event"]) == fixed
    for name, rule in rules.items():
        assert re.fullmatch(r"Portscan[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert re.fullmatch(r"[A-Z][A-Z_]+", rule["labels"]["event"]), name
        for key in ("summary", "description", "runbook_url"):
            assert rule["annotations"].get(key, "").strip(), f"{name}: no {key}"
        assert "{{ $labels.host }}" in rule["annotations"]["description"] or name == (
            "PortscanConfigReloadFailed"
        ), f"{name}: description does not name the host"


def test_port_alerts_name_host_port_and_service_and_have_no_for() -> None:
    for rule in _alert_rules():
        if rule["alert"] not in PORT_ALERTS:
            continue
        # Confirmation happens in the exporter; see the comment at the top of the rules file.
        assert "for" not in rule, rule["alert"]
        text = rule["annotations"]["summary"] + rule["annotations"]["description"]
        for label in ("host", "port", "protocol", "service"):
            assert f"$labels.{label}" in text, (rule["alert"], label)
        assert "group_left(service, product, version)" in rule["expr"], rule["alert"]


def test_every_runbook_url_points_at_an_existing_runbook_section() -> None:
    anchors = _github_anchors(RUNBOOK.read_text())
    for rule in _alert_rules():
        url = urlsplit(rule["annotations"]["runbook_url"])
        assert url.scheme == "https", rule["alert"]
        assert url.path.endswith("/docs/runbook.md"), rule["alert"]
        assert url.fragment in anchors, (rule["alert"], url.fragment, sorted(anchors))
        # One section per alert, named after it, so on-call lands on the right one.
        assert url.fragment == rule["alert"].lower(), rule["alert"]


def test_github_anchor_generation() -> None:
    anchors = _github_anchors("# A `code` Title!\n## Same\n## Same\n```\n# not a heading\n```\n")
    assert anchors == {"a-code-title", "same", "same-1"}


def test_every_alert_has_unit_tests_for_firing_not_firing_and_resolving() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    resolved: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../portscan.rules.yml"], path
        for case in doc["tests"]:
            by_alert: dict[str, list[tuple[float, set[frozenset[tuple[str, str]]]]]] = {}
            for check in case.get("alert_rule_test", []):
                firing = {frozenset(a["exp_labels"].items()) for a in check["exp_alerts"]}
                by_alert.setdefault(check["alertname"], []).append(
                    (_duration_seconds(check["eval_time"]), firing)
                )
            for name, checks in by_alert.items():
                checks.sort(key=lambda check: check[0])
                if any(firing for _, firing in checks):
                    fired.add(name)
                if any(not firing for _, firing in checks):
                    quiet.add(name)
                # Resolving: an alert expected at one time is expected gone at a later one.
                for i, (_, earlier) in enumerate(checks):
                    if any(earlier - later for _, later in checks[i + 1 :]):
                        resolved.add(name)
    names = {rule["alert"] for rule in _alert_rules()}
    assert names - fired == set(), "never tested firing"
    assert names - quiet == set(), "never tested not firing"
    assert names - resolved == set(), "never tested resolving"


def _duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(int(n) * units[u] for n, u in parts)


# --- Alertmanager example ---------------------------------------------------------------------


def _am_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(AM_EXAMPLE.read_text())
    return config


def test_alertmanager_example_structure() -> None:
    config = _am_config()
    portscan = next(
        r for r in config["route"]["routes"] if 'alertname =~ "Portscan.+"' in r["matchers"]
    )
    assert portscan["group_by"] == ["host"]
    receivers = {r["name"]: r for r in config["receivers"]}
    for name in RECEIVER_FOR_SEVERITY.values():
        integrations = [
            cfg for key, cfgs in receivers[name].items() if key.endswith("_configs") for cfg in cfgs
        ]
        assert integrations, name
        assert all(cfg.get("send_resolved") is True for cfg in integrations), name
    (inhibit,) = config["inhibit_rules"]
    assert inhibit["source_matchers"] == ['alertname = "PortscanHostUnreachable"']
    assert "host" in inhibit["equal"]
    (target,) = inhibit["target_matchers"]
    pattern = re.fullmatch(r'alertname =~ "(.*)"', target)
    assert pattern is not None
    per_port = {
        rule["alert"]
        for rule in _alert_rules()
        if "portscan_port_" in rule["expr"] and rule["alert"] != "PortscanHostUnreachable"
    }
    assert per_port >= PORT_ALERTS
    for name in {rule["alert"] for rule in _alert_rules()}:
        # Alertmanager anchors matcher regexes.
        inhibited = re.fullmatch(pattern.group(1), name) is not None
        assert inhibited == (name in per_port), name


class _Sink(BaseHTTPRequestHandler):
    """Receives whatever Alertmanager would send, so that nothing leaves the machine."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _http_json(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    return json.loads(text) if text else None


@contextlib.contextmanager
def _alertmanager(tmp_path: Path) -> Iterator[str]:
    binary = _binary("prometheus-alertmanager", "alertmanager")
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    config = _am_config()
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"http://127.0.0.1:{sink.server_address[1]}/{receiver['name']}"
    config_path = tmp_path / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (tmp_path / "alertmanager.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{base}/-/ready", timeout=1).close()
                break
            assert time.monotonic() < deadline, "alertmanager did not become ready"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        sink.shutdown()
        sink.server_close()


def test_alertmanager_inhibits_port_alerts_of_an_unreachable_host(tmp_path: Path) -> None:
    common = {"job": "portscan", "instance": "exporter:9116"}
    alerts = [
        ("PortscanHostUnreachable", "warning", "db-1.example.net", None, common),
        ("PortscanUnexpectedPortOpen", "critical", "db-1.example.net", "3306", common),
        ("PortscanServiceChanged", "warning", "db-1.example.net", "22", common),
        ("PortscanUnexpectedPortOpen", "critical", "web-1.example.net", "8080", common),
        # Same host seen from another exporter, which still reaches it.
        (
            "PortscanUnexpectedPortOpen",
            "critical",
            "db-1.example.net",
            "3306",
            {"job": "portscan", "instance": "outside:9116"},
        ),
    ]
    payload = []
    for name, severity, host, port, target in alerts:
        labels = {"alertname": name, "severity": severity, "host": host, **target}
        if port is not None:
            labels |= {"port": port, "protocol": "tcp"}
        payload.append({"labels": labels, "annotations": {"summary": name}})
    with _alertmanager(tmp_path) as base:
        _http_json(f"{base}/api/v2/alerts", payload)
        deadline = time.monotonic() + 10
        while True:
            got = _http_json(f"{base}/api/v2/alerts")
            states = {
                (
                    a["labels"]["alertname"],
                    a["labels"]["host"],
                    a["labels"].get("port"),
                    a["labels"]["instance"],
                ): a["status"]["state"]
                for a in got
            }
            if len(states) == len(alerts) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        groups = _http_json(f"{base}/api/v2/alerts/groups")
    assert states == {
        ("PortscanHostUnreachable", "db-1.example.net", None, "exporter:9116"): "active",
        ("PortscanUnexpectedPortOpen", "db-1.example.net", "3306", "exporter:9116"): "suppressed",
        ("PortscanServiceChanged", "db-1.example.net", "22", "exporter:9116"): "suppressed",
        ("PortscanUnexpectedPortOpen", "web-1.example.net", "8080", "exporter:9116"): "active",
        ("PortscanUnexpectedPortOpen", "db-1.example.net", "3306", "outside:9116"): "active",
    }
    routed = {(g["receiver"]["name"], g["labels"].get("host"), len(g["alerts"])) for g in groups}
    assert routed == {
        ("portscan-ticket", "db-1.example.net", 2),
        ("portscan-oncall", "db-1.example.net", 2),
        ("portscan-oncall", "web-1.example.net", 1),
    }
