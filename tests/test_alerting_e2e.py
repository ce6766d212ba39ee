"""The whole alerting path end to end: daemon -> Prometheus -> rules -> Alertmanager -> webhook.

Everything runs inside one network namespace: the real daemon (`python -m exporter`), a real
Prometheus (Debian package `prometheus`) scraping it every second with the shipped
`alerting-rules/portscan.rules.yml`, a real Alertmanager (`prometheus-alertmanager`) with the
shipped example routing, and a webhook receiver of this test standing in for the on-call and
ticket integrations. The scanned hosts are 127.0.0.3 and 127.0.0.4 of the namespace, with
listeners bound to those addresses, so DROPping 127.0.0.3 makes that host unreachable without
touching the other host or the connections between the servers on 127.0.0.1.

One scenario, in order, each step waiting on what the previous one left behind:
1. a new port opens: the critical page reaches the webhook, and only after the second scan saw it;
2. it closes: the resolved notification follows;
3. an expected port closes: a warning ticket (and another new port: a second page);
4. another server answers on an expected port: a ticket that says what ran there before;
5. the host stops answering: the unreachable alert arrives and both port alerts are inhibited;
6. every dashboard expression runs against this Prometheus, fed by the real daemon.
"""

from __future__ import annotations

import contextlib
import re
import socket
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_lab import DaemonProcess, Scrape, free_port_in
from tests.lab import NetNS, missing_root_reason
from tests.prometheus_lab import (
    Alertmanager,
    Notification,
    Prom,
    WebhookReceiver,
    missing_binaries_reason,
    run_alertmanager,
    run_prometheus,
    wait_for,
    webhook_receiver,
)
from tests.test_dashboards import _by_uid, _expressions, _panels, _regex, _run, _substitute

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerting-rules" / "portscan.rules.yml"
ROUTING = ROOT / "alerting-rules" / "alertmanager.example.yml"

HOST = "127.0.0.3"  # the host the scenario changes
OTHER = "127.0.0.4"  # stays as it is: it must never alert
PORTS = "2000-2300,8000-8100,9000-9100"
EXPECTED = (2222, 8080)  # HOST's expected-open list
NEW = 9090
SILENT = 9091  # accepts connections and says nothing
OTHER_OPEN = (2222,)  # OTHER learns its baseline
SSH = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
NEW_SSH = b"SSH-2.0-OpenSSH_8.4p1\r\n"
PORT_ALERTS = {"PortscanUnexpectedPortOpen", "PortscanExpectedPortClosed", "PortscanServiceChanged"}
EPSILON = 0.002  # Prometheus keeps milliseconds; the daemon's clock has more digits

_SKIP = missing_root_reason() or missing_binaries_reason(alertmanager=True)
pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.root,
    pytest.mark.slow,
]


def daemon_config(state: Path) -> str:
    return textwrap.dedent(
        f"""\
        defaults:
          ports: "{PORTS}"
          interval: 2s
          confirm_after: 1s
          timeout: 300ms
          retries: 1
          confirmations: 2
        scan:
          jitter: 0s
        fingerprint:
          timeout: 1s
        storage:
          path: {state}
        targets:
          - host: {HOST}
            expected_open: [{", ".join(map(str, EXPECTED))}]
          - host: {OTHER}
        """
    )


def routing_config(webhook: int) -> dict[str, Any]:
    """The shipped example with only the receivers' URLs and the group timers changed.

    The shipped group_wait (30s) and group_interval (5m) are tuned for scans hours apart and
    would make every notification here wait that long; 1s keeps what they do (batch the
    alerts of one host into one notification) at test speed. repeat_interval stays as
    shipped: re-notifying an unchanged alert is not part of what is tested.
    """
    config: dict[str, Any] = yaml.safe_load(ROUTING.read_text())

    def shorten(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"http://127.0.0.1:{webhook}/{receiver['name']}"
    return config


def prometheus_config(daemon: int, alertmanager: int) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager}"]}]}]
        },
        "scrape_configs": [
            {"job_name": "portscan", "static_configs": [{"targets": [f"127.0.0.1:{daemon}"]}]}
        ],
    }


class BannerPort:
    """A listener on address:port in the namespace that greets each connection with `banner`
    (silent when empty) and then closes it, as a small SSH-like server would."""

    def __init__(self, ns: NetNS, address: str, port: int, banner: bytes) -> None:
        self.sock = ns.listen(port, address)
        self.sock.settimeout(0.1)  # accept() wakes up to notice close()
        self.banner = banner
        self.stopped = threading.Event()
        self.thread = threading.Thread(
            target=self.serve, name=f"banner-{address}:{port}", daemon=True
        )
        self.thread.start()

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(1)
                if self.banner:
                    conn.sendall(self.banner)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(4096)  # let the client read the banner before the close
                else:
                    conn.recv(4096)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()


@dataclass
class Stack:
    ns: NetNS
    daemon: DaemonProcess
    prom: Prom
    am: Alertmanager
    webhook: WebhookReceiver
    ports: dict[tuple[str, int], BannerPort]

    def open(self, address: str, port: int, banner: bytes = b"") -> None:
        self.ports[(address, port)] = BannerPort(self.ns, address, port, banner)

    def close(self, address: str, port: int) -> None:
        self.ports.pop((address, port)).close()

    def explain(self) -> str:
        """What every part knows, for a failure message."""
        parts = [self.webhook.describe()]
        for name, fetch in (("prometheus", self.prom.alerts), ("alertmanager", self.am.alerts)):
            try:
                alerts = [_brief(a) for a in fetch()]
            except AssertionError as err:
                alerts = [str(err)]
            parts.append(f"{name} alerts: {alerts}")
        parts.append(f"daemon log (tail):\n{self.daemon.logs()[-3000:]}")
        return "\n".join(parts)

    def wait(self, what: str, check: Callable[[], bool], seconds: float = 20) -> None:
        wait_for(what, check, seconds, details=self.explain, interval=0.1)

    def received(
        self, alertname: str, host: str, status: str, port: int | None = None
    ) -> list[tuple[Notification, dict[str, Any]]]:
        """(notification, alert) for every webhook notification that listed this alert."""
        return [
            (note, alert)
            for note in self.webhook.snapshot()
            for alert in note.alerts
            if alert["labels"]["alertname"] == alertname
            and alert["labels"].get("host") == host
            and alert["status"] == status
            and (port is None or alert["labels"].get("port") == str(port))
        ]

    def first(
        self, alertname: str, host: str, status: str, port: int | None = None
    ) -> tuple[Notification, dict[str, Any]]:
        self.wait(
            f"a {status} {alertname} notification for {host}:{port}",
            lambda: bool(self.received(alertname, host, status, port)),
        )
        return self.received(alertname, host, status, port)[0]

    def history(self, host: str) -> dict[str, Any]:
        history: dict[str, Any] = self.daemon.json(f"/api/v1/history?host={host}&since=1h")
        return history


def _brief(alert: dict[str, Any]) -> str:
    labels = alert["labels"]
    state = alert.get("state") or alert.get("status", {}).get("state")
    return f"{labels['alertname']}{{host={labels.get('host')},port={labels.get('port')}}}={state}"


def _time(rfc3339: str) -> float:
    """Unix seconds of an Alertmanager timestamp (Go prints up to nanoseconds)."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", rfc3339.replace("Z", "+00:00"))
    return datetime.fromisoformat(text).timestamp()


def _event(history: dict[str, Any], port: int, kind: str, resolved: bool) -> dict[str, Any]:
    events = [
        e
        for e in history["events"]
        if e["port"] == port and e["event"] == kind and e["resolved"] is resolved
    ]
    assert len(events) == 1, (port, kind, resolved, history["events"])
    event: dict[str, Any] = events[0]
    return event


def _scan(history: dict[str, Any], scan_id: int) -> dict[str, Any]:
    scan: dict[str, Any] = next(s for s in history["scans"] if s["id"] == scan_id)
    return scan


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with contextlib.ExitStack() as cleanup:
        ns = cleanup.enter_context(NetNS("psa"))
        webhook = cleanup.enter_context(webhook_receiver(ns))
        ports: dict[tuple[str, int], BannerPort] = {}

        @cleanup.callback
        def close_ports() -> None:
            for port in ports.values():
                port.close()

        # One after the other, each on a port picked once the previous one listens: no two
        # can be handed the same free port.
        config = tmp_path / "config.yaml"
        config.write_text(daemon_config(tmp_path / "state.sqlite"))
        daemon = DaemonProcess(ns, config, free_port_in(ns))

        @cleanup.callback
        def stop_daemon() -> None:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.terminate()

        for port in EXPECTED:
            ports[(HOST, port)] = BannerPort(ns, HOST, port, SSH if port == 2222 else b"")
        for port in OTHER_OPEN:
            ports[(OTHER, port)] = BannerPort(ns, OTHER, port, SSH)
        daemon.start()
        am = cleanup.enter_context(
            run_alertmanager(tmp_path / "alertmanager", routing_config(webhook.port), ns=ns)
        )
        prom = cleanup.enter_context(
            run_prometheus(
                tmp_path / "prometheus",
                prometheus_config(daemon.port, am.port),
                ns=ns,
                # A firing alert is re-sent every minute by default: one sent before
                # Alertmanager was discovered would only arrive a minute later.
                extra_args=["--rules.alert.resend-delay=1s"],
            )
        )
        s = Stack(ns, daemon, prom, am, webhook, ports)
        yield s
    # Every scan went through the whole pipeline, and the shutdown too: nothing was logged
    # as an exception.
    assert '"exception"' not in daemon.logs(), daemon.logs()[-3000:]


def test_alerts_travel_from_scan_to_webhook_and_dashboards_query_the_daemon(
    stack: Stack,
) -> None:
    s = stack
    # Prometheus applies its targets and finds its Alertmanager ~5 s after it starts.
    s.wait(
        "Prometheus to scrape both hosts' first scans",
        lambda: len(s.prom.query("portscan_scan_success == 1")) == 2,
        seconds=30,
    )
    s.wait(
        "Prometheus to discover Alertmanager",
        lambda: bool(s.prom.get("/api/v1/alertmanagers")["activeAlertmanagers"]),
    )
    assert not s.webhook.snapshot(), s.explain()

    _new_port_pages_only_after_the_second_scan(s)
    _closing_it_again_resolves_the_page(s)
    _closed_expected_port_opens_a_ticket(s)
    _service_change_says_what_ran_before(s)
    _unreachable_host_inhibits_its_port_alerts(s)

    notes = s.webhook.snapshot()
    for note in notes:
        for alert in note.alerts:
            labels = alert["labels"]
            assert labels["host"] == HOST, (note, s.explain())
            if labels["severity"] == "critical":
                assert note.payload["receiver"] == note.path[1:] == "portscan-oncall", note
            else:
                assert note.payload["receiver"] == note.path[1:] == "portscan-ticket", note
    assert {a["labels"]["alertname"] for n in notes for a in n.alerts} == {
        "PortscanUnexpectedPortOpen",
        "PortscanExpectedPortClosed",
        "PortscanServiceChanged",
        "PortscanHostUnreachable",
    }, s.explain()

    _dashboards_have_data(s)
    # Inhibited, the port alerts stayed out of every notification that followed.
    dark = s.first("PortscanHostUnreachable", HOST, "firing")[0].received
    for note in s.webhook.snapshot():
        if note.received > dark:
            assert {a["labels"]["alertname"] for a in note.alerts}.isdisjoint(PORT_ALERTS), note


def _new_port_pages_only_after_the_second_scan(s: Stack) -> None:
    s.open(HOST, NEW, NEW_SSH)
    # The first scrape that shows the change pending: nothing may have alerted up to then.
    # Prometheus and the webhook are read first, so that they were read while it was pending.
    pending: list[Scrape] = []

    def first_sighting() -> bool:
        notes = s.received("PortscanUnexpectedPortOpen", HOST, "firing", NEW)
        alerts = [a for a in s.prom.alerts() if a["labels"]["alertname"] in PORT_ALERTS]
        scrape = s.daemon.scrape()
        if scrape.port("portscan_port_change_pending", HOST, NEW, change="PORT_NEW_OPEN") != 1:
            return False
        assert scrape.port("portscan_port_unexpected_open", HOST, NEW) == 0, scrape.text
        assert not notes and not alerts, (alerts, s.explain())
        pending.append(scrape)
        return True

    s.wait("the first sighting of the new port", first_sighting)
    hosts = {h["host"]: h for h in s.daemon.json("/api/v1/hosts")["hosts"]}
    (port,) = [p for p in hosts[HOST]["ports"] if p["port"] == NEW]
    first_seen = port["pending"]["first_seen"]
    assert port["pending"]["count"] == 1, port

    note, alert = s.first("PortscanUnexpectedPortOpen", HOST, "firing", NEW)
    history = s.history(HOST)
    event = _event(history, NEW, "PORT_NEW_OPEN", resolved=False)
    confirming = _scan(history, event["scan_id"])
    previous = max(
        (x for x in history["scans"] if x["id"] < confirming["id"]), key=lambda x: x["id"]
    )
    # Confirmed by the scan right after the first sighting: the second one that saw the port.
    assert abs(previous["finished"] - first_seen) < EPSILON, (previous, first_seen)
    assert previous["open_ports"] == confirming["open_ports"] == len(EXPECTED) + 1, history
    assert confirming["finished"] > first_seen
    assert _time(alert["startsAt"]) >= confirming["finished"] - EPSILON, (alert, confirming)
    assert note.received >= confirming["finished"], (note, confirming)

    assert note.payload["receiver"] == "portscan-oncall" and note.path == "/portscan-oncall"
    assert note.payload["groupLabels"] == {"host": HOST}
    labels = alert["labels"]
    assert labels["severity"] == "critical" and labels["event"] == "PORT_NEW_OPEN", labels
    # One alert per change whichever exporter (or HA pair) saw it: no job or instance label.
    assert labels["protocol"] == "tcp" and "job" not in labels and "instance" not in labels
    # The rule joined the identification of the port made by the real fingerprinter.
    assert (labels["service"], labels["product"], labels["version"]) == (
        "ssh",
        "OpenSSH",
        "8.4p1",
    ), labels
    assert alert["annotations"]["summary"] == f"{HOST} -- port {NEW}/tcp (ssh) is now open"
    description = alert["annotations"]["description"]
    assert description.startswith(
        f"{HOST} -- port {NEW}/tcp is now open (confirmed on 2 consecutive scans at "
    ), description
    assert "Service: ssh (OpenSSH 8.4p1)." in description
    # The expected-open list is the baseline; 2222 was identified, 8080 never said a word.
    baseline = "Previous baseline: 2222/ssh, 8080/tcp | Severity: High (critical)."
    assert baseline in description, description
    assert alert["annotations"]["runbook_url"].endswith("#portscanunexpectedportopen")


def _closing_it_again_resolves_the_page(s: Stack) -> None:
    s.close(HOST, NEW)
    note, alert = s.first("PortscanUnexpectedPortOpen", HOST, "resolved", NEW)
    event = _event(s.history(HOST), NEW, "PORT_NEW_OPEN", resolved=True)
    assert _time(alert["endsAt"]) >= event["at"] - EPSILON, (alert, event)
    assert note.payload["receiver"] == "portscan-oncall"
    assert note.payload["status"] == "resolved", note.payload


def _closed_expected_port_opens_a_ticket(s: Stack) -> None:
    s.close(HOST, 8080)
    # And a page in force as well when the host goes dark in the next step.
    s.open(HOST, SILENT)
    note, alert = s.first("PortscanExpectedPortClosed", HOST, "firing", 8080)
    event = _event(s.history(HOST), 8080, "PORT_NOW_CLOSED", resolved=False)
    assert _time(alert["startsAt"]) >= event["at"] - EPSILON, (alert, event)
    assert note.payload["receiver"] == "portscan-ticket" and note.path == "/portscan-ticket"
    labels = alert["labels"]
    assert labels["severity"] == "warning" and labels["event"] == "PORT_NOW_CLOSED", labels
    # A closed port has no identification: the rule's `or` branch, empty service labels.
    assert "service" not in labels, labels
    description = alert["annotations"]["description"]
    assert f"{HOST} -- port 8080/tcp is now closed (confirmed on 2 consecutive scans" in (
        description
    ), description
    assert "the scan got a reset" in description and "Severity: Medium (warning)" in description

    note, alert = s.first("PortscanUnexpectedPortOpen", HOST, "firing", SILENT)
    assert note.payload["receiver"] == "portscan-oncall"
    assert alert["labels"]["service"] == "unknown", alert  # it never said a word


def _service_change_says_what_ran_before(s: Stack) -> None:
    s.close(HOST, 2222)
    s.open(HOST, 2222, NEW_SSH)  # another SSH server on the expected port
    note, alert = s.first("PortscanServiceChanged", HOST, "firing", 2222)
    assert note.payload["receiver"] == "portscan-ticket", note.payload
    labels = alert["labels"]
    assert labels["event"] == "PORT_SERVICE_CHANGED" and labels["severity"] == "warning"
    assert (labels["service"], labels["product"], labels["version"]) == (
        "ssh",
        "OpenSSH",
        "8.4p1",
    )
    summary = alert["annotations"]["summary"]
    assert summary == (
        f"{HOST} -- service on port 2222/tcp changed: ssh (OpenSSH 9.2p1) → ssh (OpenSSH 8.4p1)"
    ), summary
    description = alert["annotations"]["description"]
    assert (
        f"{HOST} -- port 2222/tcp changed from ssh (OpenSSH 9.2p1) to ssh (OpenSSH 8.4p1)"
        " (confirmed on 2 consecutive scans at " in description
    ), description
    assert "Severity: Medium (warning)" in description, description


def _unreachable_host_inhibits_its_port_alerts(s: Stack) -> None:
    s.ns.iptables("-A", "INPUT", "-d", HOST, "-j", "DROP")
    note, alert = s.first("PortscanHostUnreachable", HOST, "firing")
    assert note.payload["receiver"] == "portscan-ticket", note.payload
    assert alert["labels"]["severity"] == "warning"
    # The notification that carries it is the one of the host's ticket group, which held the
    # closed-port alert so far: that alert is now left out of it, not resolved.
    assert [a["labels"]["alertname"] for a in note.alerts] == ["PortscanHostUnreachable"], (
        s.explain()
    )

    # Still firing in Prometheus (the gauges are frozen), only Alertmanager holds them back.
    in_force = {
        ("PortscanExpectedPortClosed", "8080"),
        ("PortscanUnexpectedPortOpen", str(SILENT)),
        ("PortscanServiceChanged", "2222"),
    }
    firing = {
        (a["labels"]["alertname"], a["labels"].get("port"))
        for a in s.prom.alerts()
        if a["state"] == "firing"
    }
    assert firing == in_force | {("PortscanHostUnreachable", None)}, s.explain()
    held = {(a["labels"]["alertname"], a["labels"].get("port")): a["status"] for a in s.am.alerts()}
    for key in in_force:
        assert held[key]["state"] == "suppressed" and held[key]["inhibitedBy"], (key, held)
    assert held[("PortscanHostUnreachable", None)]["state"] == "active", held
    scrape = s.daemon.scrape()
    assert scrape.value("portscan_scan_success", host=HOST) == 0
    assert scrape.port("portscan_port_expected_closed", HOST, 8080) == 1
    assert scrape.port("portscan_port_unexpected_open", HOST, SILENT) == 1
    assert scrape.value("portscan_scan_success", host=OTHER) == 1


def _dashboards_have_data(s: Stack) -> None:
    """Every dashboard expression parses and, unless empty by design here, returns series."""
    overview = _by_uid("portscan-overview")
    no_tls = {"Ports/E"}  # no port of the lab speaks TLS
    for selection in (".*", _regex([HOST, OTHER])):
        for where, expr, instant in _expressions(overview):
            result = _run(s.prom, _substitute(expr, {"host": selection}), instant)
            assert bool(result) != (where in no_tls), f"{where} for host=~{selection!r}: {result}"

    table = next(p for p in _panels(overview) if p["title"] == "Hosts")
    for t in table["targets"]:
        rows = s.prom.query(_substitute(t["expr"], {"host": ".*"}))
        assert sorted(r["metric"]["host"] for r in rows) == [HOST, OTHER], (t["refId"], rows)
    status = next(t for t in table["targets"] if t["refId"] == "A")
    rows = s.prom.query(_substitute(status["expr"], {"host": ".*"}))
    assert {r["metric"]["host"]: float(r["value"][1]) for r in rows} == {
        HOST: 3.0,  # Unreachable
        OTHER: 0.0,  # Stable
    }

    host_dashboard = _by_uid("portscan-host")
    for host in (HOST, OTHER):
        empty = {"Service identity/E"}
        if host == OTHER:
            empty.add("annotation Host unreachable")
        for where, expr, instant in _expressions(host_dashboard):
            result = _run(s.prom, _substitute(expr, {"host": host}), instant)
            assert bool(result) != (where in empty), f"{where} for {host}: {result}"
