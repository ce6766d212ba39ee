"""The alert contract across the exporter's own life, end to end, exact notifications.

The real daemon(s), a real Prometheus loading the shipped rules and a real Alertmanager with
the shipped routing, all in one namespace, with a webhook receiver of this test standing in
for on-call and the ticket queue (the set-up of test_alerting_e2e.py). Each test drives one
story and asserts the whole sequence of notifications it caused:

- kill -9, an outage with Prometheus scraping the dead target, a restart and a clean restart:
  the page for an open port is sent once and resolved once, when the port really closes;
  PortscanExporterDown fires during the outage and resolves after it;
- an upgrade from the previous release (its store migrated at start): the same;
- a pair of identical replicas: one notification per change, and one replica dying changes
  nothing;
- two vantages: one alert each;
- several ports of a host back to baseline: one all-clear notification for the host.

The outage lasts OUTAGE_SECONDS instead of half an hour: the rules hold the last state with a
rule evaluated every second against its own previous value, so what holds for twenty
evaluations holds for any number of them.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_lab import DaemonProcess, free_port_in
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
from tests.test_alerting_e2e import SSH, BannerPort, routing_config

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerting-rules" / "portscan.rules.yml"
# The release before the stored service fingerprints changed format (store schema 1): the
# upgrade test runs it first, then this tree on the same store.
PREVIOUS_RELEASE = "07ea182"

HOST = "127.0.0.3"
EXPECTED = 2222
NEW, NEW2 = 9090, 9092
OUTAGE_SECONDS = 20.0
EXPORTER_DOWN_FOR = "4s"  # shipped: minutes; the same rule, sooner
# Long enough for anything an event could still cause to have reached the webhook: a scan
# (2 s), a scrape and an evaluation (1 s each), Alertmanager's group wait and interval (1 s).
QUIET_SECONDS = 8.0
OPEN_ALERT = "PortscanUnexpectedPortOpen"
DOWN_ALERT = "PortscanExporterDown"

_SKIP = missing_root_reason() or missing_binaries_reason(alertmanager=True)
pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.root,
    pytest.mark.slow,
]


def daemon_config(state: Path, vantage: str | None = None) -> str:
    return (f"vantage: {vantage}\n" if vantage else "") + textwrap.dedent(
        f"""\
        defaults:
          ports: "2000-2300,9000-9100"
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
            expected_open: [{EXPECTED}]
        """
    )


def rules_for_test(path: Path) -> Path:
    """The shipped rules with only PortscanExporterDown's `for:` shortened."""
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    found = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == DOWN_ALERT:
                rule["for"] = EXPORTER_DOWN_FOR
                found += 1
    assert found == 1, f"{DOWN_ALERT} is not shipped"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@dataclass
class Lab:
    ns: NetNS
    tmp: Path
    daemons: list[DaemonProcess]
    webhook: WebhookReceiver
    am: Alertmanager | None = None
    prom: Prom | None = None
    ports: dict[int, BannerPort] = field(default_factory=dict)

    def open(self, port: int, banner: bytes = SSH) -> None:
        self.ports[port] = BannerPort(self.ns, HOST, port, banner)

    def close(self, port: int) -> None:
        self.ports.pop(port).close()

    def _reject(self, action: str, ports: tuple[int, ...]) -> None:
        self.ns.iptables(
            action, "INPUT", "-d", HOST, "-p", "tcp", "-m", "multiport",
            "--dports", ",".join(map(str, ports)), "-j", "REJECT", "--reject-with", "tcp-reset",
        )  # fmt: skip

    def open_together(self, *ports: int) -> None:
        """Open several ports in one instant, so that every scan sees all or none of them."""
        self._reject("-I", ports)
        for port in ports:
            self.open(port)
        self._reject("-D", ports)

    def close_together(self, *ports: int) -> None:
        self._reject("-I", ports)  # refused (RST), as closed ports are
        for port in ports:
            self.close(port)
        self._reject("-D", ports)

    @property
    def prometheus(self) -> Prom:
        assert self.prom is not None
        return self.prom

    def explain(self) -> str:
        parts = [self.webhook.describe()]
        with contextlib.suppress(AssertionError):
            parts.append(f"prometheus alerts: {self.prometheus.alerts()}")
        for daemon in self.daemons:
            parts.append(f"daemon {daemon.port} log (tail):\n{daemon.logs()[-2000:]}")
        return "\n".join(parts)

    def wait(self, what: str, check: Callable[[], bool], seconds: float = 30) -> None:
        wait_for(what, check, seconds, details=self.explain, interval=0.1)

    def sequence(self, alertname: str, port: int | None = None) -> list[tuple[str, str]]:
        """(alert status, vantage) of `alertname` in each notification, in order received."""
        return [
            (alert["status"], alert["labels"].get("vantage", ""))
            for note in self.webhook.snapshot()
            for alert in note.alerts
            if alert["labels"]["alertname"] == alertname
            and (port is None or alert["labels"].get("port") == str(port))
        ]

    def notes(self, alertname: str) -> list[Notification]:
        return [
            note
            for note in self.webhook.snapshot()
            if any(a["labels"]["alertname"] == alertname for a in note.alerts)
        ]

    def wait_for_sequence(
        self, alertname: str, port: int | None, expected: list[tuple[str, str]]
    ) -> None:
        self.wait(
            f"notifications {expected} of {alertname} {port}",
            lambda: self.sequence(alertname, port) == expected,
        )

    def expect_exactly(
        self, alertname: str, port: int | None, expected: list[tuple[str, str]]
    ) -> None:
        """These notifications arrive, and nothing more follows while things settle."""
        self.wait_for_sequence(alertname, port, expected)
        time.sleep(QUIET_SECONDS)
        assert self.sequence(alertname, port) == expected, self.explain()

    def firing_in_prometheus(self, alertname: str) -> list[dict[str, Any]]:
        return [
            a
            for a in self.prometheus.alerts()
            if a["labels"]["alertname"] == alertname and a["state"] == "firing"
        ]

    def ready(self) -> None:
        self.wait(
            "Prometheus to scrape every exporter",
            lambda: len(self.prometheus.query("up == 1")) == len(self.daemons),
        )
        self.wait(
            "Prometheus to discover Alertmanager",
            lambda: bool(self.prometheus.get("/api/v1/alertmanagers")["activeAlertmanagers"]),
        )


@contextlib.contextmanager
def lab(tmp_path: Path, vantages: list[str | None], *, source: Path | None = None) -> Iterator[Lab]:
    """Exporters (one per entry of `vantages`, each with its own store), scraped by one
    Prometheus that sends to one Alertmanager; HOST has its expected port open."""
    with contextlib.ExitStack() as cleanup:
        ns = cleanup.enter_context(NetNS("psl"))
        webhook = cleanup.enter_context(webhook_receiver(ns))
        daemons = []
        for index, vantage in enumerate(vantages):
            home = tmp_path / f"exporter{index}"
            home.mkdir()
            config = home / "config.yaml"
            config.write_text(daemon_config(home / "state.sqlite", vantage))
            daemons.append(DaemonProcess(ns, config, free_port_in(ns), source=source))
        the_lab = Lab(ns, tmp_path, daemons, webhook)

        @cleanup.callback
        def stop() -> None:
            for port in the_lab.ports.values():
                port.close()
            for daemon in daemons:
                if daemon.proc is not None and daemon.proc.poll() is None:
                    daemon.terminate()

        the_lab.open(EXPECTED)
        for daemon in daemons:
            daemon.start()
        the_lab.am = cleanup.enter_context(
            run_alertmanager(tmp_path / "alertmanager", routing_config(webhook.port), ns=ns)
        )
        prometheus_yml = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules_for_test(tmp_path / "rules.yml"))],
            "alerting": {
                "alertmanagers": [
                    {"static_configs": [{"targets": [f"127.0.0.1:{the_lab.am.port}"]}]}
                ]
            },
            "scrape_configs": [
                {
                    "job_name": "portscan",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{daemon.port}" for daemon in daemons]}
                    ],
                }
            ],
        }
        the_lab.prom = cleanup.enter_context(
            run_prometheus(
                tmp_path / "prometheus",
                prometheus_yml,
                ns=ns,
                extra_args=["--rules.alert.resend-delay=1s"],
            )
        )
        the_lab.ready()
        yield the_lab


def test_kill9_outage_and_restarts_neither_resolve_nor_repage(tmp_path: Path) -> None:
    with lab(tmp_path, [None]) as s:
        (daemon,) = s.daemons
        s.open(NEW)
        s.wait_for_sequence(OPEN_ALERT, NEW, [("firing", "")])

        daemon.kill9()
        s.wait_for_sequence(DOWN_ALERT, None, [("firing", "")])
        time.sleep(OUTAGE_SECONDS)  # Prometheus scrapes the dead target all along
        assert s.firing_in_prometheus(OPEN_ALERT), s.explain()
        assert s.sequence(OPEN_ALERT, NEW) == [("firing", "")], s.explain()

        daemon.start()  # same store: the state is re-exposed before any scan
        s.wait_for_sequence(DOWN_ALERT, None, [("firing", ""), ("resolved", "")])
        daemon.terminate()
        daemon.start()
        time.sleep(QUIET_SECONDS)
        assert s.sequence(OPEN_ALERT, NEW) == [("firing", "")], s.explain()

        s.close(NEW)
        s.expect_exactly(OPEN_ALERT, NEW, [("firing", ""), ("resolved", "")])
        # A clean restart is over before the exporter-down alert's `for:`; if this machine
        # was slow enough for it to fire, it resolved too. Nothing else was ever sent.
        downs = s.sequence(DOWN_ALERT)
        assert downs[:2] == [("firing", ""), ("resolved", "")], s.explain()
        assert downs in ([("firing", ""), ("resolved", "")] * 2, downs[:2]), s.explain()
        assert {a["labels"]["alertname"] for n in s.webhook.snapshot() for a in n.alerts} == {
            OPEN_ALERT,
            DOWN_ALERT,
        }, s.explain()
        print(s.webhook.describe())


def _previous_release(tmp_path: Path) -> Path:
    """The previous release's package, extracted from this repository's history."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("the upgrade test needs git and this repository's history")
    target = tmp_path / "previous-release"
    target.mkdir()
    archive = subprocess.run(
        [git, "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "exporter"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        pytest.skip(f"release {PREVIOUS_RELEASE} is not in this clone's history")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def test_upgrade_from_the_previous_release_keeps_the_alert(tmp_path: Path) -> None:
    previous = _previous_release(tmp_path)
    with lab(tmp_path, [None], source=previous) as s:
        (old,) = s.daemons
        s.open(NEW)
        s.wait_for_sequence(OPEN_ALERT, NEW, [("firing", "")])
        old.terminate()

        new = DaemonProcess(s.ns, old.config, old.port)  # this tree, on the same store
        s.daemons[0] = new
        new.start()
        history = new.json(f"/api/v1/history?host={HOST}&since=1h")
        assert [e["port"] for e in history["events"] if e["event"] == "PORT_NEW_OPEN"] == [NEW]
        time.sleep(QUIET_SECONDS)
        assert s.sequence(OPEN_ALERT, NEW) == [("firing", "")], s.explain()
        scrape = new.scrape()
        assert scrape.port("portscan_port_unexpected_open", HOST, NEW) == 1
        # The migrated baseline still matches what answers on the expected port: no change.
        assert scrape.port("portscan_port_service_changed", HOST, EXPECTED) == 0

        s.close(NEW)
        s.wait_for_sequence(OPEN_ALERT, NEW, [("firing", ""), ("resolved", "")])
        assert {a["labels"]["alertname"] for n in s.webhook.snapshot() for a in n.alerts} <= {
            OPEN_ALERT,
            DOWN_ALERT,
        }, s.explain()
        print(s.webhook.describe())


def test_a_pair_of_replicas_notifies_once_per_change(tmp_path: Path) -> None:
    with lab(tmp_path, [None, None]) as s:
        first, second = s.daemons
        s.open(NEW)
        s.wait_for_sequence(OPEN_ALERT, NEW, [("firing", "")])
        time.sleep(QUIET_SECONDS)  # the second replica confirms it too: nothing new is sent
        (note,) = s.notes(OPEN_ALERT)
        (alert,) = note.alerts
        assert "instance" not in alert["labels"], alert["labels"]

        first.kill9()  # the other replica carries on: no resolve, no new page
        time.sleep(QUIET_SECONDS)
        first.start()
        time.sleep(QUIET_SECONDS)
        assert s.sequence(OPEN_ALERT, NEW) == [("firing", "")], s.explain()

        s.close(NEW)
        s.expect_exactly(OPEN_ALERT, NEW, [("firing", ""), ("resolved", "")])
        assert second.proc is not None and second.proc.poll() is None
        print(s.webhook.describe())


def test_two_vantages_raise_two_alerts(tmp_path: Path) -> None:
    with lab(tmp_path, ["inside", "outside"]) as s:
        s.open(NEW)
        s.wait(
            "one page per vantage",
            lambda: (
                sorted(s.sequence(OPEN_ALERT, NEW)) == [("firing", "inside"), ("firing", "outside")]
            ),
        )
        groups = sorted(
            tuple(sorted(n.payload["groupLabels"].items())) for n in s.notes(OPEN_ALERT)
        )
        assert groups == [
            (("host", HOST), ("vantage", "inside")),
            (("host", HOST), ("vantage", "outside")),
        ], s.explain()
        s.close(NEW)
        both = [("firing", "inside"), ("firing", "outside")]
        both += [("resolved", "inside"), ("resolved", "outside")]
        s.wait("both resolved", lambda: sorted(s.sequence(OPEN_ALERT, NEW)) == both)
        time.sleep(QUIET_SECONDS)
        assert sorted(s.sequence(OPEN_ALERT, NEW)) == both, s.explain()
        print(s.webhook.describe())


def test_a_host_back_to_its_baseline_gets_one_all_clear(tmp_path: Path) -> None:
    with lab(tmp_path, [None]) as s:
        s.open_together(NEW, NEW2)
        s.wait(
            "one page listing both ports",
            lambda: len(s.sequence(OPEN_ALERT)) == 2,
        )
        (page,) = s.notes(OPEN_ALERT)
        assert sorted(a["labels"]["port"] for a in page.alerts) == [str(NEW), str(NEW2)]
        assert page.payload["status"] == "firing"

        s.close_together(NEW, NEW2)
        s.wait("the all-clear", lambda: len(s.notes(OPEN_ALERT)) == 2)
        time.sleep(QUIET_SECONDS)
        first_page, all_clear = s.notes(OPEN_ALERT)
        assert first_page is page, s.explain()
        assert all_clear.payload["status"] == "resolved", s.explain()
        assert all_clear.payload["groupLabels"] == {"host": HOST}, all_clear.payload
        assert sorted((a["labels"]["port"], a["status"]) for a in all_clear.alerts) == [
            (str(NEW), "resolved"),
            (str(NEW2), "resolved"),
        ], s.explain()
        assert all_clear.path == "/portscan-oncall"
        print(s.webhook.describe())
