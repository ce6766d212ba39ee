"""Identification of real Debian daemons on their standard ports, inside a network namespace.

One lab (tests/services/lab.py) serves the whole module: nginx on 80, 443 (TLS) and 8080,
OpenSSH, Postfix (25, 465), Dovecot (110, 143, 993, 995), vsftpd, MariaDB, PostgreSQL, Redis
and memcached, plus misbehaving services on 7001-7005. Expected products and versions come
from the installed packages (dpkg), certificate facts from `openssl x509`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter import eventloop
from exporter.fingerprint import Fingerprinter, FingerprintOptions, Identification
from exporter.model import ServiceIdentity
from tests.services.lab import (
    ADDRESS,
    DAEMONS,
    HOSTILE_PORTS,
    SERVER_NAME,
    ServiceLab,
    unavailable_reason,
)

ROOT = Path(__file__).resolve().parent.parent
NMAP_PROBES = Path("/usr/share/nmap/nmap-service-probes")
DAEMON_OF = {port: daemon.name for daemon in DAEMONS for port in daemon.ports}
TLS_PORTS = (443, 465, 993, 995)
STARTTLS_PORTS = (21, 25, 110, 143)

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
]


@pytest.fixture(scope="module")
def lab() -> Iterator[ServiceLab]:
    with ServiceLab(hostile=True) as running:
        yield running


def scan(
    lab: ServiceLab, ports: list[int], options: FingerprintOptions | None = None
) -> dict[int, Identification]:
    """Identify `ports` of the lab, with nmap's database merged in when `options` say so."""
    fingerprinter = Fingerprinter.load(options or FingerprintOptions(), dialer=lab.dial)
    return eventloop.run(fingerprinter.identify_ports(ADDRESS, ports))


@pytest.fixture(scope="module")
def first_scan(lab: ServiceLab) -> dict[int, Identification]:
    return scan(lab, sorted(lab.ports))


def running(lab: ServiceLab, port: int) -> None:
    """Skip or fail, with the reason, when the daemon for `port` is not up."""
    name = DAEMON_OF[port]
    if name in lab.skipped:
        pytest.skip(lab.skipped[name])
    if name in lab.failed:
        pytest.fail(f"{name} did not start: {lab.failed[name]}")


def brief(identity: ServiceIdentity) -> tuple[str, str, str]:
    return identity.service, identity.product, identity.version


@pytest.mark.parametrize("port", sorted(DAEMON_OF))
def test_each_daemon_is_identified(
    lab: ServiceLab, first_scan: dict[int, Identification], port: int
) -> None:
    running(lab, port)
    expected = lab.expected()[port]
    identity = first_scan[port].identity
    assert brief(identity) == (expected.service, expected.product, expected.version), identity
    assert identity.banner and identity.banner.isprintable()
    if expected.version:  # the daemons that disclose one: nginx, OpenSSH, Redis, ...
        assert identity.version


@pytest.mark.parametrize("port", [*TLS_PORTS, *STARTTLS_PORTS])
def test_tls_details_match_the_certificate(
    lab: ServiceLab, first_scan: dict[int, Identification], port: int
) -> None:
    running(lab, port)
    assert lab.cert is not None
    tls = first_scan[port].identity.tls
    assert tls is not None, f"no TLS details on port {port}"
    assert tls.protocol in ("TLSv1.2", "TLSv1.3")
    assert tls.sha256 == lab.cert.sha256
    assert tls.not_after == lab.cert.not_after
    assert tls.subject == lab.cert.subject == f"O=portscan-exporter lab,CN={SERVER_NAME}"
    assert tls.issuer == tls.subject
    assert tls.sans == (SERVER_NAME, f"www.{SERVER_NAME}", ADDRESS)


def test_starttls_can_be_turned_off(lab: ServiceLab, first_scan: dict[int, Identification]) -> None:
    ports = [port for port in STARTTLS_PORTS if port in lab.ports]
    results = scan(lab, ports, FingerprintOptions(starttls=False))
    for port in ports:
        plain, upgraded = results[port].identity, first_scan[port].identity
        assert plain.tls is None and upgraded.tls is not None
        assert brief(plain) == brief(upgraded)


def test_ten_scans_give_identical_fingerprints(
    lab: ServiceLab, first_scan: dict[int, Identification]
) -> None:
    ports = sorted(lab.ports)
    fingerprinter = Fingerprinter.load(FingerprintOptions(), dialer=lab.dial)

    async def ten() -> list[dict[int, Identification]]:
        return [await fingerprinter.identify_ports(ADDRESS, ports) for _ in range(10)]

    rounds = eventloop.run(ten())
    for port in ports:
        seen = {results[port].identity.fingerprint for results in rounds}
        assert seen == {first_scan[port].identity.fingerprint}, (port, seen)


def test_hostile_services_next_to_real_ones(
    lab: ServiceLab, first_scan: dict[int, Identification]
) -> None:
    options = FingerprintOptions(timeout=2.0)
    results = scan(lab, [*lab.ports, *HOSTILE_PORTS.values()], options)
    for kind, port in HOSTILE_PORTS.items():
        result = results[port]
        assert result.duration_seconds <= options.timeout + 0.75, (kind, result)
        assert result.bytes_read <= options.max_bytes, (kind, result)
        assert result.identity.service == "unknown", (kind, result)
        assert len(result.identity.banner) <= 256 and result.identity.banner.isprintable()
    for port in lab.ports:
        assert brief(results[port].identity) == brief(first_scan[port].identity), port


@pytest.mark.skipif(not NMAP_PROBES.exists(), reason="nmap not installed (Debian package nmap)")
def test_with_nmap_probes_merged_the_lab_reads_the_same(
    lab: ServiceLab, first_scan: dict[int, Identification]
) -> None:
    results = scan(lab, sorted(lab.ports), FingerprintOptions(nmap_service_probes=NMAP_PROBES))
    for port in lab.ports:
        merged, builtin = results[port].identity, first_scan[port].identity
        assert (brief(merged), merged.extra) == (brief(builtin), builtin.extra), port
        assert merged.fingerprint == builtin.fingerprint


def test_the_scan_command_inside_the_namespace(lab: ServiceLab) -> None:
    ports = [port for port in (22, 443) if port in lab.ports]
    if not ports:
        pytest.skip("neither sshd nor nginx is running in the lab")
    out = lab.ns.run(
        "env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "exporter", "scan", ADDRESS,
        "--ports", ",".join(map(str, ports)), "--format", "json",
    ).stdout  # fmt: skip
    records = {record["port"]: record for record in json.loads(out)["ports"]}
    assert sorted(records) == ports
    for port in ports:
        expected = lab.expected()[port]
        assert (records[port]["service"], records[port]["product"]) == (
            expected.service,
            expected.product,
        )
