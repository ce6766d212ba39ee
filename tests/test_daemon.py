"""The real daemon end to end: real listeners, real firewall, scraped over HTTP.

The scanned host is 127.0.0.3 inside a namespace (listeners bound to 0.0.0.0 there); the
daemon serves HTTP on 127.0.0.1, so DROPping 127.0.0.3 makes the host unreachable without
cutting the scrape.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_lab import DaemonProcess, Scrape, free_port_in
from tests.lab import NetNS, requires_netns

HOST = "127.0.0.3"
BASELINE = [2222, 8080]
NEW = 9090
PORTS = "2000-2300,8000-8100,9000-9100"


def config_text(state: Path, extra: str = "") -> str:
    return (
        textwrap.dedent(
            f"""\
        defaults:
          interval: 1500ms
          confirm_after: 700ms
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
            ports: "{PORTS}"
        """
        )
        + extra
    )


class Listeners:
    def __init__(self, ns: NetNS) -> None:
        self.ns = ns
        self.socks: dict[int, socket.socket] = {}

    def open(self, port: int) -> None:
        self.socks[port] = self.ns.listen(port, "0.0.0.0")

    def close(self, port: int) -> None:
        self.socks.pop(port).close()

    def close_all(self) -> None:
        for port in list(self.socks):
            self.close(port)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[NetNS, Listeners, DaemonProcess]]:
    with NetNS("pse") as ns:
        listeners = Listeners(ns)
        for port in BASELINE:
            listeners.open(port)
        config = tmp_path / "config.yaml"
        config.write_text(config_text(tmp_path / "state.sqlite"))
        daemon = DaemonProcess(ns, config, free_port_in(ns))
        try:
            yield ns, listeners, daemon
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                assert daemon.terminate() == 0  # SIGTERM: a clean, bounded shutdown
            listeners.close_all()
        # Every scan went through the whole pipeline: no exception was caught and logged.
        assert '"exception"' not in daemon.logs(), daemon.logs()[-3000:]


def gauges(scrape: Scrape, port: int) -> dict[str, float | None]:
    return {
        "open": scrape.port("portscan_port_open", HOST, port),
        "unexpected_open": scrape.port("portscan_port_unexpected_open", HOST, port),
        "expected_closed": scrape.port("portscan_port_expected_closed", HOST, port),
        "pending_new": scrape.port(
            "portscan_port_change_pending", HOST, port, change="PORT_NEW_OPEN"
        ),
        "pending_closed": scrape.port(
            "portscan_port_change_pending", HOST, port, change="PORT_NOW_CLOSED"
        ),
    }


def next_scan(daemon: DaemonProcess, scrape: Scrape) -> Scrape:
    return daemon.wait_for_scan(HOST, scrape.scans(HOST))


def settle(daemon: DaemonProcess) -> Scrape:
    """Wait for a scan that started after now (the one in flight may predate a change)."""
    first = daemon.wait_for_scan(HOST, daemon.scrape().scans(HOST))
    return next_scan(daemon, first)


def first_sighting_of_new_port(daemon: DaemonProcess, listeners: Listeners) -> Scrape:
    """Start the daemon, let it learn the baseline, open NEW: the scrape of its first sighting.

    Until then (the scan in flight may predate the listener) nothing about NEW is confirmed.
    """
    daemon.start()
    scrape = daemon.wait_for_scan(HOST, 0)
    listeners.open(NEW)
    for _ in range(5):
        if scrape.port("portscan_port_change_pending", HOST, NEW, change="PORT_NEW_OPEN") == 1:
            return scrape
        assert scrape.port("portscan_port_unexpected_open", HOST, NEW) in (None, 0)
        scrape = next_scan(daemon, scrape)
    raise AssertionError(f"port {NEW} was not seen in 5 scans; log:\n{daemon.logs()[-3000:]}")


@requires_netns
def test_two_scan_confirmation_of_new_closed_and_resolved(
    lab: tuple[NetNS, Listeners, DaemonProcess],
) -> None:
    _ns, listeners, daemon = lab
    # A new port: pending after the first sighting, confirmed only after the second.
    scrape = first_sighting_of_new_port(daemon, listeners)
    assert scrape.value("portscan_scan_success", host=HOST) == 1
    for port in BASELINE:
        assert scrape.port("portscan_port_expected", HOST, port) == 1
        assert scrape.port("portscan_port_open", HOST, port) == 1
    assert gauges(scrape, NEW)["unexpected_open"] == 0
    scrape = next_scan(daemon, scrape)
    assert gauges(scrape, NEW) | {"open": 1} == {
        "open": 1,
        "unexpected_open": 1,
        "expected_closed": 0,
        "pending_new": None,
        "pending_closed": None,
    }

    # A baseline port closes: expected_closed after two scans, not one.
    listeners.close(8080)
    scrape = daemon.scrape()
    while scrape.port("portscan_port_change_pending", HOST, 8080, change="PORT_NOW_CLOSED") != 1:
        assert scrape.port("portscan_port_expected_closed", HOST, 8080) == 0
        scrape = next_scan(daemon, scrape)
    assert scrape.port("portscan_port_expected_closed", HOST, 8080) == 0
    scrape = next_scan(daemon, scrape)
    assert scrape.port("portscan_port_expected_closed", HOST, 8080) == 1
    assert scrape.port("portscan_port_open", HOST, 8080) == 0

    # Back to the baseline: both clear, again after two agreeing scans.
    listeners.open(8080)
    listeners.close(NEW)
    scrape = settle(daemon)
    scrape = next_scan(daemon, scrape)
    assert scrape.port("portscan_port_expected_closed", HOST, 8080) == 0
    assert scrape.port("portscan_port_open", HOST, 8080) == 1
    assert scrape.port("portscan_port_unexpected_open", HOST, NEW) in (None, 0)

    history = daemon.json(f"/api/v1/history?host={HOST}&since=1h")
    kinds = [(e["port"], e["event"], e["resolved"]) for e in history["events"] if e["port"]]
    assert kinds.count((NEW, "PORT_NEW_OPEN", False)) == 1
    assert kinds.count((NEW, "PORT_NEW_OPEN", True)) == 1
    assert kinds.count((8080, "PORT_NOW_CLOSED", False)) == 1
    assert kinds.count((8080, "PORT_NOW_CLOSED", True)) == 1


@requires_netns
def test_one_flapping_scan_never_flips_a_gauge(
    lab: tuple[NetNS, Listeners, DaemonProcess],
) -> None:
    _ns, listeners, daemon = lab
    scrape = first_sighting_of_new_port(daemon, listeners)
    listeners.close(NEW)  # gone before the confirming scan (confirm_after is 700 ms)
    for _ in range(3):
        scrape = next_scan(daemon, scrape)
        assert scrape.port("portscan_port_unexpected_open", HOST, NEW) in (None, 0)
    assert scrape.port("portscan_port_change_pending", HOST, NEW, change="PORT_NEW_OPEN") in (
        None,
        0,
    )


@requires_netns
def test_unreachable_host_is_not_all_closed(lab: tuple[NetNS, Listeners, DaemonProcess]) -> None:
    ns, _listeners, daemon = lab
    daemon.start()
    scrape = daemon.wait_for_scan(HOST, 0)
    ns.iptables("-A", "INPUT", "-d", HOST, "-j", "DROP")
    scrape = settle(daemon)
    for _ in range(2):
        scrape = next_scan(daemon, scrape)
        assert scrape.value("portscan_scan_success", host=HOST) == 0
        for port in BASELINE:
            assert scrape.port("portscan_port_expected_closed", HOST, port) == 0
            assert scrape.port("portscan_port_open", HOST, port) == 1
            assert (
                scrape.port("portscan_port_change_pending", HOST, port, change="PORT_NOW_CLOSED")
                is None
            )
    assert scrape.value("portscan_scans_total", host=HOST, result="unreachable")


@requires_netns
def test_kill9_between_sightings_then_restart(
    lab: tuple[NetNS, Listeners, DaemonProcess],
) -> None:
    _ns, listeners, daemon = lab
    first_sighting_of_new_port(daemon, listeners)
    daemon.kill9()

    daemon.start()
    scrape = daemon.scrape()  # restored from the store before any new scan
    assert scrape.port("portscan_port_change_pending", HOST, NEW, change="PORT_NEW_OPEN") == 1
    scrape = daemon.wait_for_scan(HOST, 0)
    assert scrape.port("portscan_port_unexpected_open", HOST, NEW) == 1

    # Restart again: the confirmed change is in force at once and not emitted again.
    daemon.kill9()
    daemon.start()
    assert daemon.scrape().port("portscan_port_unexpected_open", HOST, NEW) == 1
    daemon.wait_for_scan(HOST, 1)
    history = daemon.json(f"/api/v1/history?host={HOST}&since=1h")
    opened = [e for e in history["events"] if e["port"] == NEW and e["event"] == "PORT_NEW_OPEN"]
    assert len(opened) == 1


@requires_netns
def test_bad_reload_keeps_running_config_and_promtool_is_silent(
    lab: tuple[NetNS, Listeners, DaemonProcess], tmp_path: Path
) -> None:
    _ns, _listeners, daemon = lab
    daemon.start()
    scrape = daemon.wait_for_scan(HOST, 0)
    daemon.config.write_text(daemon.config.read_text().replace("1500ms", "soon"))
    status, body = daemon.request("POST", "/-/reload")
    assert status == 500
    assert b"config.yaml:2: defaults.interval" in body
    scrape = next_scan(daemon, daemon.scrape())
    assert scrape.value("portscan_config_last_reload_successful") == 0
    assert scrape.value("portscan_scan_success", host=HOST) == 1

    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run(
            [promtool, "check", "metrics"], input=scrape.text, capture_output=True, text=True
        )
        assert check.returncode == 0 and check.stdout + check.stderr == "", check.stdout

    # A good reload that drops the host: it stops being exported, its history stays.
    daemon.config.write_text(
        config_text(tmp_path / "state.sqlite").replace(f"host: {HOST}", "host: 127.0.0.4")
    )
    status, _ = daemon.request("POST", "/-/reload")
    assert status == 200
    scrape = daemon.scrape()
    assert scrape.value("portscan_config_last_reload_successful") == 1
    assert scrape.value("portscan_scan_success", host=HOST) is None
    history = daemon.json(f"/api/v1/history?host={HOST}&since=1h")
    assert history["scans"]
    assert json.dumps(history)

    # SIGHUP reloads too: a host added to the file gets scanned.
    daemon.config.write_text(daemon.config.read_text() + "  - host: 127.0.0.5\n")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_until(
        lambda: daemon.scrape().value("portscan_scan_success", host="127.0.0.5") == 1,
        what="the host added by SIGHUP to be scanned",
    )


@requires_netns
def test_cli_accept_while_running_and_history(
    lab: tuple[NetNS, Listeners, DaemonProcess],
) -> None:
    ns, listeners, daemon = lab
    daemon.start()
    scrape = daemon.wait_for_scan(HOST, 0)
    listeners.open(NEW)
    while scrape.port("portscan_port_unexpected_open", HOST, NEW) != 1:
        scrape = next_scan(daemon, scrape)

    cli = [sys.executable, "-m", "exporter"]
    config = str(daemon.config)
    accepted = ns.run(*cli, "baseline", "accept", "--host", HOST, "--port", str(NEW),
                      "--config", config)  # fmt: skip
    assert f"baseline of port {NEW} of {HOST} accepted" in accepted.stdout
    # The daemon picks the other process's write up without a restart.
    daemon.wait_until(
        lambda: daemon.scrape().port("portscan_port_unexpected_open", HOST, NEW) == 0,
        what="the accepted port to stop alerting",
    )
    scrape = next_scan(daemon, daemon.scrape())
    assert scrape.port("portscan_port_expected", HOST, NEW) == 1
    assert scrape.port("portscan_port_unexpected_open", HOST, NEW) == 0

    table = ns.run(*cli, "history", "--host", HOST, "--since", "1h", "--config", config)
    assert f"{NEW}/tcp" in table.stdout and "PORT_NEW_OPEN" in table.stdout
    assert "BASELINE_ACCEPTED" in table.stdout
    out = json.loads(
        ns.run(*cli, "history", "--host", HOST, "--format", "json", "--config", config).stdout
    )
    assert any(e["port"] == NEW and e["event"] == "PORT_NEW_OPEN" for e in out["events"])
    assert {iv["port"] for iv in out["intervals"]} >= {*BASELINE, NEW}

    unknown = ns.run(*cli, "history", "--host", "192.0.2.1", "--config", config, check=False)
    assert unknown.returncode == 1 and "192.0.2.1" in unknown.stderr
    refused = ns.run(*cli, "baseline", "accept", "--host", "192.0.2.1", "--config", config,
                     check=False)  # fmt: skip
    assert refused.returncode == 1 and "192.0.2.1" in refused.stderr


@requires_netns
def test_a_full_disk_is_seen_retried_with_backoff_and_recovered(tmp_path: Path) -> None:
    """The store on a tiny tmpfs that fills up: every scan's write fails with `database or
    disk is full`. That shows on /metrics, /-/ready and the page, the exported next scan stays
    overdue, retries back off, and freeing space brings everything back without a restart."""
    volume = tmp_path / "volume"
    volume.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(volume)], check=True)
    try:
        config = tmp_path / "config.yaml"
        config.write_text(config_text(volume / "state.sqlite"))
        with NetNS("psf") as ns:
            listeners = Listeners(ns)
            for port in BASELINE:
                listeners.open(port)
            daemon = DaemonProcess(ns, config, free_port_in(ns))
            daemon.start()
            try:
                _fill_and_free(daemon, volume)
            finally:
                assert daemon.terminate() == 0
                listeners.close_all()
    finally:
        subprocess.run(["umount", str(volume)], check=False)


def _fill_and_free(daemon: DaemonProcess, volume: Path) -> None:
    scrape = daemon.wait_for_scan(HOST, 1)
    assert scrape.value("portscan_store_last_write_successful") == 1
    filler = volume / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:  # until ENOSPC
            out.write(b"\0" * 65536)
            out.flush()

    def failing() -> bool:
        s = daemon.scrape()
        return s.value("portscan_store_last_write_successful") == 0

    daemon.wait_until(failing, timeout=30, what="a refused write")
    failed = daemon.scrape()
    errors = failed.value("portscan_scans_total", host=HOST, result="error")
    assert errors is not None and errors >= 1, failed.text
    assert (failed.value("portscan_store_write_errors_total") or 0) >= 1
    status, body = daemon.get("/-/ready")
    assert status == 503 and b"store refuses writes" in body, body
    status, page = daemon.get("/")
    assert status == 200 and b"The store refuses writes" in page
    overdue = failed.value("portscan_next_scan_timestamp_seconds", host=HOST)
    assert overdue is not None and overdue < time.time(), "the failed scan does not show overdue"

    # Backed off: a retry 10 s after the first failure, not one per interval (1.5 s).
    time.sleep(6)
    later = daemon.scrape()
    assert later.value("portscan_scans_total", host=HOST, result="error") == errors, later.text
    assert later.value("portscan_next_scan_timestamp_seconds", host=HOST) == overdue
    assert daemon.logs().count("store write failed") == errors

    filler.unlink()
    daemon.wait_until(
        lambda: daemon.scrape().value("portscan_store_last_write_successful") == 1,
        timeout=40,
        what="a write after space was freed",
    )
    assert daemon.get("/-/ready")[0] == 200
    recovered = daemon.scrape()
    assert recovered.value("portscan_store_last_write_success_timestamp_seconds") is not None
    assert (recovered.value("portscan_next_scan_timestamp_seconds", host=HOST) or 0) > overdue
