"""`portscan-exporter scan HOST` as a user runs it: a subprocess, against real listeners.

Targets are listeners these tests opened: an HTTP server on an ephemeral port of this
machine's loopback, bare sockets and nginx inside network namespaces.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from exporter.model import encode_fingerprint
from exporter.portsets import top_ports
from tests.lab import NetNS, listeners, requires_netns
from tests.services.lab import ADDRESS, SERVER_NAME, ServiceLab, unavailable_reason

NMAP_PROBES = Path("/usr/share/nmap/nmap-service-probes")
PYTHON_HTTP = ("http", "Python http.server", platform.python_version())


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", "scan", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The port rows of a table, by their PORT cell, split on the column boundaries."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("PORT"))
    starts = [lines[header].index(name) for name in lines[header].split()]
    rows: dict[str, list[str]] = {}
    for line in lines[header + 1 :]:
        if "/tcp" not in line:
            break
        bounds = [*starts[1:], len(line)]
        rows[line.split()[0]] = [line[a:b].strip() for a, b in zip(starts, bounds, strict=True)]
    return rows


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[int]:
    """Python's http.server on an ephemeral port of this machine's loopback, in a thread."""

    def handler(*args: Any) -> _QuietHandler:
        return _QuietHandler(*args, directory=str(tmp_path))

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# -- without root: only the port this test opened ------------------------------------------------


def test_identifies_the_service_on_an_open_port(http_server: int) -> None:
    port = http_server
    out = json.loads(cli("127.0.0.1", "--ports", str(port), "--format", "json").stdout)
    (entry,) = out["ports"]
    banner = entry.pop("banner")
    assert entry == {
        "port": port,
        "protocol": "tcp",
        "state": "open",
        "service": PYTHON_HTTP[0],
        "product": PYTHON_HTTP[1],
        "version": PYTHON_HTTP[2],
        "extra": "",
        "tls": None,
        "fingerprint": encode_fingerprint(*PYTHON_HTTP, ""),
    }
    assert banner.startswith("HTTP/1.0 200 OK\\r\\nServer: SimpleHTTP/")  # sanitized

    table = cli("127.0.0.1", "--ports", str(port))
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[1].split() == ["PORT", "STATE", "SERVICE", "VERSION"]
    assert table_rows(table.stdout) == {
        f"{port}/tcp": [f"{port}/tcp", "open", "http", f"{PYTHON_HTTP[1]} {PYTHON_HTTP[2]}"]
    }


def test_no_identify_keeps_the_bare_scan(http_server: int) -> None:
    port = http_server
    out = json.loads(
        cli("127.0.0.1", "--ports", str(port), "--format", "json", "--no-identify").stdout
    )
    assert out["ports"] == [{"port": port, "protocol": "tcp", "state": "open"}]
    table = cli("127.0.0.1", "--ports", str(port), "--no-identify").stdout.splitlines()
    assert table[1:] == ["PORT      STATE", f"{f'{port}/tcp':<10}open", "closed: 0, filtered: 0"]


@pytest.mark.skipif(not NMAP_PROBES.exists(), reason="nmap not installed (Debian package nmap)")
def test_nmap_probes_merged_read_the_same(http_server: int) -> None:
    port = http_server
    proc = cli(
        "127.0.0.1", "--ports", str(port), "--format", "json",
        "--nmap-service-probes", str(NMAP_PROBES),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)["ports"][0]
    assert (entry["service"], entry["product"], entry["version"]) == PYTHON_HTTP


def test_bad_identification_options_are_one_line_errors(tmp_path: Path, http_server: int) -> None:
    # Refused before anything is scanned (the port is ours all the same).
    port = str(http_server)
    missing = cli("127.0.0.1", "--ports", port, "--nmap-service-probes", str(tmp_path / "none"))
    assert missing.returncode == 2, missing.stdout
    assert missing.stderr.count("\n") == 1 and "--nmap-service-probes" in missing.stderr
    broken = tmp_path / "probes"
    broken.write_text("match http m|^HTTP|\n")  # a rule before any Probe
    bad_file = cli("127.0.0.1", "--ports", port, "--nmap-service-probes", str(broken))
    assert bad_file.returncode == 2, bad_file.stdout
    assert bad_file.stderr.count("\n") == 1 and f"{broken}:1:" in bad_file.stderr
    for timeout in ("soon", "0s"):
        bad_timeout = cli("127.0.0.1", "--ports", port, "--identify-timeout", timeout)
        assert bad_timeout.returncode == 2, bad_timeout.stdout
        assert bad_timeout.stderr.count("\n") == 1
        assert bad_timeout.stderr.startswith("portscan-exporter scan: --identify-timeout: ")


# -- namespaces -----------------------------------------------------------------------------------


@requires_netns
def test_scan_command_json() -> None:
    with NetNS() as ns, listeners(ns, [22, 8080]):
        proc = ns.run(
            sys.executable, "-m", "exporter", "scan", "127.0.0.1",
            "--ports", "top100,8000-8100", "--format", "json", "--no-identify",
        )  # fmt: skip
    out = json.loads(proc.stdout)
    assert out["host"] == "127.0.0.1" and out["address"] == "127.0.0.1"
    assert out["answered"] is True
    assert out["ports_scanned"] == len(set(top_ports(100)) | set(range(8000, 8101)))
    assert out["ports"] == [
        {"port": 22, "protocol": "tcp", "state": "open"},
        {"port": 8080, "protocol": "tcp", "state": "open"},
    ]
    assert isinstance(out["duration_seconds"], float)


@requires_netns
def test_scan_command_errors_are_one_line() -> None:
    with NetNS() as ns:
        bad_ports = ns.run(
            sys.executable, "-m", "exporter", "scan", "127.0.0.1", "--ports", "top10000",
            check=False,
        )  # fmt: skip
        bad_name = ns.run(sys.executable, "-m", "exporter", "scan", "x.invalid", check=False)
    assert bad_ports.returncode == 2
    assert bad_ports.stderr.count("\n") == 1 and "top10000" in bad_ports.stderr
    assert bad_name.returncode == 1
    assert bad_name.stderr.count("\n") == 1 and "x.invalid" in bad_name.stderr


@requires_netns
def test_silent_ports_are_unknown_within_the_identify_timeout() -> None:
    # Accepted by the kernel, never answered: each port costs its whole time limit.
    with NetNS() as ns, listeners(ns, [22, 8080]):
        started = time.monotonic()
        proc = ns.run(
            sys.executable, "-m", "exporter", "scan", "127.0.0.1", "--ports", "22,8080,8081",
            "--format", "json", "--all-states", "--identify-timeout", "400ms",
        )  # fmt: skip
        elapsed = time.monotonic() - started
    ports = {entry["port"]: entry for entry in json.loads(proc.stdout)["ports"]}
    for port in (22, 8080):
        assert ports[port]["service"] == "unknown" and ports[port]["product"] == ""
        assert ports[port]["extra"] == "no answer within the time limit"
    assert ports[8081] == {"port": 8081, "protocol": "tcp", "state": "closed"}
    assert elapsed < 4.0  # the default limit (5 s) would not fit


@pytest.mark.root
@pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")
def test_nginx_versions_and_certificate() -> None:
    with ServiceLab(only={"nginx"}) as lab:
        if "nginx" in lab.skipped or "nginx" in lab.failed:
            pytest.skip(lab.skipped.get("nginx") or f"nginx did not start: {lab.failed['nginx']}")
        assert lab.cert is not None
        expected = lab.expected()
        json_run = lab.ns.run(
            sys.executable, "-m", "exporter", "scan", ADDRESS, "--ports", "80,443,8080",
            "--format", "json",
        )  # fmt: skip
        table_run = lab.ns.run(
            sys.executable, "-m", "exporter", "scan", ADDRESS, "--ports", "80,443,8080"
        )
    ports = {entry["port"]: entry for entry in json.loads(json_run.stdout)["ports"]}
    assert sorted(ports) == [80, 443, 8080]
    for port, entry in ports.items():
        want = expected[port]
        assert (entry["service"], entry["product"], entry["version"]) == (
            want.service,
            want.product,
            want.version,
        )
        assert (entry["tls"] is not None) == want.tls
    cert = lab.cert
    assert ports[443]["tls"] == {
        "protocol": ports[443]["tls"]["protocol"],
        "subject": cert.subject,
        "issuer": cert.subject,
        "sans": [SERVER_NAME, f"www.{SERVER_NAME}", ADDRESS],
        "not_after": cert.not_after,
        "not_after_rfc3339": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cert.not_after)),
        "sha256": cert.sha256,
    }
    assert ports[443]["tls"]["protocol"] in ("TLSv1.2", "TLSv1.3")

    rows = table_rows(table_run.stdout)
    for port in (80, 443, 8080):
        want = expected[port]
        assert rows[f"{port}/tcp"] == [
            f"{port}/tcp",
            "open",
            want.service,
            f"{want.product} {want.version}".strip(),
        ]
