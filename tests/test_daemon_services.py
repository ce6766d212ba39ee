"""PORT_SERVICE_CHANGED end to end: the real daemon watching a real nginx in a namespace.

Another HTTP server taking over nginx's port, and nginx reloaded with another certificate
(same name), must each be confirmed as a service change after exactly two scans; nginx
restarted as it was must not be a change at all.

Every swap happens right after a scan, while the next one is at least `QUIET` seconds away,
so "the first scan that sees the new server" is a scan that started after the swap.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_lab import DaemonProcess, Scrape, free_port_in
from tests.lab import NetNS, missing_root_reason
from tests.services.lab import (
    ADDRESS,
    SERVER_NAME,
    Certificate,
    make_certificate,
    upstream_version,
)

HTTP_PORT, TLS_PORT = 8080, 8443
PORTS = "8070-8090,8440-8450"
INTERVAL = 2.0
VALIDITY_SECONDS = 30 * 86400  # of the certificates make_certificate writes
QUIET = 1.2  # seconds a swap may take before the next scan starts
CHANGES = ("PORT_NEW_OPEN", "PORT_NOW_CLOSED", "PORT_SERVICE_CHANGED", "RETURN_TO_BASELINE")
PYTHON_HTTP = ("http", "Python http.server", platform.python_version())


def _skip_reason() -> str | None:
    reason = missing_root_reason()
    if reason is None and shutil.which("nginx") is None:
        reason = "nginx not installed (Debian package nginx)"
    if reason is None and shutil.which("openssl") is None:
        reason = "openssl not installed (Debian package openssl)"
    return reason


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


def config_text(state: Path) -> str:
    return textwrap.dedent(
        f"""\
        defaults:
          interval: {INTERVAL:g}s
          confirm_after: 700ms
          timeout: 300ms
          retries: 1
          confirmations: 2
        scan:
          jitter: 0s
        fingerprint:
          timeout: 2s
        storage:
          path: {state}
        targets:
          - host: {ADDRESS}
            ports: "{PORTS}"
        """
    )


def wait_listening(ns: NetNS, port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        try:
            ns.call(socket.create_connection, (ADDRESS, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} not listening on {port} after 15 s")


def served_certificate(ns: NetNS, port: int) -> str:
    """SHA-256 of the certificate a new connection to `port` gets."""

    def fetch() -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection((ADDRESS, port), timeout=2) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()

    return ns.call(fetch)


class Nginx:
    """nginx in `ns` with a private config: plain HTTP on `http`, TLS on `tls` (either may
    be None)."""

    def __init__(self, ns: NetNS, root: Path, *, http: int | None, tls: int | None) -> None:
        self.ns, self.root, self.http, self.tls = ns, root, http, tls
        self.conf = root / "nginx.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "nginx-temp").mkdir(exist_ok=True)

    def configure(self, cert: Certificate | None) -> None:
        temp = self.root / "nginx-temp"
        servers = []
        if self.http is not None:
            servers.append(
                f'server {{ listen {ADDRESS}:{self.http}; location / {{ return 200 "lab\\n"; }} }}'
            )
        if self.tls is not None:
            assert cert is not None
            servers.append(
                f"server {{ listen {ADDRESS}:{self.tls} ssl; server_name {SERVER_NAME};\n"
                f"    ssl_certificate {cert.pem}; ssl_certificate_key {cert.key};\n"
                f'    location / {{ return 200 "lab\\n"; }} }}'
            )
        body = "\n    ".join(servers)
        self.conf.write_text(
            f"""worker_processes 1;
pid {self.root / "nginx.pid"};
error_log {self.root / "nginx-error.log"};
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    {body}
}}
"""
        )

    def start(self) -> None:
        self.proc = self.ns.spawn(
            "nginx", "-e", str(self.root / "nginx-error.log"),
            "-g", "daemon off;", "-c", str(self.conf),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        for port in (self.http, self.tls):
            if port is not None:
                wait_listening(self.ns, port, self.proc, "nginx")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)

    def reload(self, cert: Certificate) -> None:
        """SIGHUP with `cert` configured: the listening sockets stay open throughout."""
        assert self.proc is not None and self.tls is not None
        self.configure(cert)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served_certificate(self.ns, self.tls) != cert.sha256:
            assert time.monotonic() < deadline, "nginx still serves the old certificate"
            time.sleep(0.05)


@dataclass
class Lab:
    ns: NetNS
    root: Path
    daemon: DaemonProcess
    cert: Certificate
    version: str  # nginx's upstream version, as nginx discloses it

    def nginx_identities(self) -> dict[int, tuple[str, str, str]]:
        return {
            HTTP_PORT: ("http", "nginx", self.version),
            TLS_PORT: ("https", "nginx", self.version),
        }

    def nginx(self, *, http: int | None = None, tls: int | None = None) -> Nginx:
        server = Nginx(self.ns, self.root, http=http, tls=tls)
        server.configure(self.cert if tls is not None else None)
        server.start()
        return server


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    (tmp_path / "cert-a").mkdir()
    cert = make_certificate(tmp_path / "cert-a", SERVER_NAME, ADDRESS)
    with NetNS("psv") as ns:
        config = tmp_path / "config.yaml"
        config.write_text(config_text(tmp_path / "state.sqlite"))
        daemon = DaemonProcess(ns, config, free_port_in(ns))
        try:
            yield Lab(ns, tmp_path, daemon, cert, upstream_version("nginx"))
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                assert daemon.terminate() == 0
        # Every scan went through the whole pipeline: no exception was caught and logged.
        assert '"exception"' not in daemon.logs(), daemon.logs()[-3000:]


# -- reading the daemon ---------------------------------------------------------------------------


def next_scan(daemon: DaemonProcess, scrape: Scrape) -> Scrape:
    return daemon.wait_for_scan(ADDRESS, scrape.scans(ADDRESS))


def service_info(scrape: Scrape, port: int) -> list[tuple[str, str, str]]:
    return [
        (s.labels["service"], s.labels["product"], s.labels["version"])
        for s in scrape.samples
        if s.name == "portscan_port_service_info"
        and s.labels.get("host") == ADDRESS
        and s.labels.get("port") == str(port)
    ]


def port_value(scrape: Scrape, name: str, port: int, **labels: str) -> float | None:
    return scrape.port(f"portscan_port_{name}", ADDRESS, port, **labels)


def pending(scrape: Scrape, port: int) -> dict[str, float | None]:
    return {change: port_value(scrape, "change_pending", port, change=change) for change in CHANGES}


def quiet_scrape(daemon: DaemonProcess, scrape: Scrape) -> Scrape:
    """A scrape taken right after a scan, with the next scan at least QUIET seconds away."""
    for _ in range(5):
        due = scrape.value("portscan_next_scan_timestamp_seconds", host=ADDRESS)
        if due is not None and due - time.time() >= QUIET:
            return scrape
        scrape = next_scan(daemon, scrape)
    raise AssertionError("the daemon never left a quiet window between scans")


def assert_no_scan_since(daemon: DaemonProcess, quiet: Scrape) -> None:
    """The swap ended before the next scan started: that scan sees only the new server."""
    due = quiet.value("portscan_next_scan_timestamp_seconds", host=ADDRESS)
    assert due is not None and time.time() < due, "the swap took longer than the quiet window"
    assert daemon.scrape().scans(ADDRESS) == quiet.scans(ADDRESS)


def service_changes(daemon: DaemonProcess, port: int) -> list[dict[str, Any]]:
    history = daemon.json(f"/api/v1/history?host={ADDRESS}&since=1h")
    return [
        e for e in history["events"] if e["port"] == port and e["event"] == "PORT_SERVICE_CHANGED"
    ]


def baseline(lab: Lab, ports: dict[int, tuple[str, str, str]]) -> Scrape:
    """Start the daemon and return the scrape after the scan that learned `ports`."""
    lab.daemon.start()
    scrape = lab.daemon.wait_for_scan(ADDRESS, 0)
    assert scrape.value("portscan_scan_success", host=ADDRESS) == 1
    for port, identity in ports.items():
        assert port_value(scrape, "expected", port) == 1
        assert service_info(scrape, port) == [identity]
    return scrape


# -- the tests -----------------------------------------------------------------------------------


def test_another_http_server_on_the_port_is_a_confirmed_service_change(lab: Lab) -> None:
    nginx_http = ("http", "nginx", lab.version)
    nginx = lab.nginx(http=HTTP_PORT)
    scrape = quiet_scrape(lab.daemon, baseline(lab, {HTTP_PORT: nginx_http}))

    nginx.stop()
    other = lab.ns.spawn(
        sys.executable, "-m", "http.server", "--bind", ADDRESS, str(HTTP_PORT),
        "--directory", str(lab.root),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_listening(lab.ns, HTTP_PORT, other, "python -m http.server")
    assert_no_scan_since(lab.daemon, scrape)

    scrape = next_scan(lab.daemon, scrape)
    assert pending(scrape, HTTP_PORT)["PORT_SERVICE_CHANGED"] == 1
    assert port_value(scrape, "service_changed", HTTP_PORT) == 0
    assert service_info(scrape, HTTP_PORT) == [nginx_http]  # still the confirmed identity
    assert service_changes(lab.daemon, HTTP_PORT) == []

    scrape = next_scan(lab.daemon, scrape)
    assert port_value(scrape, "service_changed", HTTP_PORT) == 1
    assert set(pending(scrape, HTTP_PORT).values()) == {None}
    assert port_value(scrape, "open", HTTP_PORT) == 1
    assert port_value(scrape, "expected_closed", HTTP_PORT) == 0
    assert service_info(scrape, HTTP_PORT) == [PYTHON_HTTP]
    (event,) = service_changes(lab.daemon, HTTP_PORT)
    assert event["resolved"] is False and event["severity"] == "medium"
    old, new = event["old_service"], event["new_service"]
    assert (old["service"], old["product"], old["version"]) == nginx_http
    assert (new["service"], new["product"], new["version"]) == PYTHON_HTTP

    # In force, and told once: a further scan adds nothing.
    scrape = next_scan(lab.daemon, scrape)
    assert port_value(scrape, "service_changed", HTTP_PORT) == 1
    assert len(service_changes(lab.daemon, HTTP_PORT)) == 1


def test_another_certificate_is_a_confirmed_service_change(lab: Lab) -> None:
    nginx_https = ("https", "nginx", lab.version)
    nginx = lab.nginx(tls=TLS_PORT)
    first = lab.cert
    scrape = baseline(lab, {TLS_PORT: nginx_https})
    assert port_value(scrape, "tls_cert_expiry_timestamp_seconds", TLS_PORT) == first.not_after

    # Same name, other key, and a later notAfter: made at least a second after the first
    # (openssl counts validity from the current second).
    while time.time() < first.not_after - VALIDITY_SECONDS + 1:
        time.sleep(0.05)
    (lab.root / "cert-b").mkdir()
    second = make_certificate(lab.root / "cert-b", SERVER_NAME, ADDRESS)
    assert second.subject == first.subject and second.sha256 != first.sha256
    assert second.not_after > first.not_after

    scrape = quiet_scrape(lab.daemon, scrape)
    nginx.reload(second)
    assert_no_scan_since(lab.daemon, scrape)

    scrape = next_scan(lab.daemon, scrape)
    assert pending(scrape, TLS_PORT)["PORT_SERVICE_CHANGED"] == 1
    assert port_value(scrape, "service_changed", TLS_PORT) == 0
    assert port_value(scrape, "tls_cert_expiry_timestamp_seconds", TLS_PORT) == first.not_after

    scrape = next_scan(lab.daemon, scrape)
    assert port_value(scrape, "service_changed", TLS_PORT) == 1
    assert set(pending(scrape, TLS_PORT).values()) == {None}
    assert port_value(scrape, "tls_cert_expiry_timestamp_seconds", TLS_PORT) == second.not_after
    assert service_info(scrape, TLS_PORT) == [nginx_https]  # only the certificate changed
    (event,) = service_changes(lab.daemon, TLS_PORT)
    assert event["old_service"]["tls_sha256"] == first.sha256
    assert event["new_service"]["tls_sha256"] == second.sha256
    assert event["old_service"]["product"] == event["new_service"]["product"] == "nginx"


def test_the_same_nginx_restarted_is_no_change(lab: Lab) -> None:
    identities = {
        HTTP_PORT: ("http", "nginx", lab.version),
        TLS_PORT: ("https", "nginx", lab.version),
    }
    nginx = lab.nginx(http=HTTP_PORT, tls=TLS_PORT)
    scrape = quiet_scrape(lab.daemon, baseline(lab, identities))

    nginx.stop()
    nginx.start()
    assert_no_scan_since(lab.daemon, scrape)

    for _ in range(3):
        scrape = next_scan(lab.daemon, scrape)
        for port, identity in identities.items():
            assert set(pending(scrape, port).values()) == {None}, (port, pending(scrape, port))
            assert port_value(scrape, "service_changed", port) == 0
            assert port_value(scrape, "expected_closed", port) == 0
            assert port_value(scrape, "open", port) == 1
            assert service_info(scrape, port) == [identity]
        expiry = port_value(scrape, "tls_cert_expiry_timestamp_seconds", TLS_PORT)
        assert expiry == lab.cert.not_after
    history = lab.daemon.json(f"/api/v1/history?host={ADDRESS}&since=1h")
    assert [e for e in history["events"] if e["port"] is not None] == []


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)"
)
def test_promtool_is_silent_on_service_and_certificate_series(lab: Lab) -> None:
    lab.nginx(http=HTTP_PORT, tls=TLS_PORT)
    scrape = baseline(lab, lab.nginx_identities())
    assert port_value(scrape, "tls_cert_expiry_timestamp_seconds", TLS_PORT) == lab.cert.not_after
    check = subprocess.run(
        ["promtool", "check", "metrics"],
        input=scrape.text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0 and check.stdout + check.stderr == "", check.stdout + check.stderr
