"""The identification engine against real sockets on 127.0.0.1 ephemeral ports opened here.

Misbehaving services (tests/services/hostile.py), Python's own HTTP server over plain TCP and
over TLS (with a certificate made by openssl), and the engine's limits. The real Debian
daemons are in test_fingerprint_lab.py.
"""

from __future__ import annotations

import asyncio
import http.server
import platform
import shutil
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exporter import eventloop
from exporter.fingerprint import Fingerprinter, FingerprintOptions, Identification, SignatureDB
from exporter.model import ScanResult, ServiceIdentity
from tests.services import hostile
from tests.services.lab import Certificate, make_certificate

LOOPBACK = "127.0.0.1"
NMAP_PROBES = Path("/usr/share/nmap/nmap-service-probes")
SLACK = 0.75  # scheduling slack on a busy 2-core machine
BUILTIN = Fingerprinter(SignatureDB.builtin())


@dataclass
class Seen:
    """What a test server saw of our requests."""

    hosts: list[str] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: Seen

    def do_GET(self) -> None:
        self.seen.hosts.append(self.headers.get("Host", ""))
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[int, Seen]]:
    seen = Seen()
    handler = type("Handler", (_Handler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl binary (Debian package openssl)")
    return make_certificate(tmp_path_factory.mktemp("tls"), "app.example.test", LOOPBACK)


@pytest.fixture
def https_server(certificate: Certificate) -> Iterator[tuple[int, Seen]]:
    seen = Seen()
    handler = type("Handler", (_Handler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate.pem, certificate.key)
    context.sni_callback = lambda sock, name, ctx: seen.sni.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def hostile_ports() -> AsyncIterator[dict[str, int]]:
    servers = {kind: await hostile.start(kind) for kind in hostile.BEHAVIOURS}
    try:
        yield {kind: server.sockets[0].getsockname()[1] for kind, server in servers.items()}
    finally:
        for server in servers.values():
            server.close()


def _assert_bounded(result: Identification, options: FingerprintOptions) -> None:
    assert result.duration_seconds <= options.timeout + SLACK, result
    assert result.bytes_read <= options.max_bytes, result
    identity = result.identity
    assert identity.service == "unknown", identity
    assert len(identity.banner) <= 256 and identity.banner.isprintable()
    assert identity.extra.isprintable()


# -- misbehaving services -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(hostile.BEHAVIOURS))
async def test_a_hostile_service_costs_at_most_the_bounds(
    kind: str, hostile_ports: dict[str, int]
) -> None:
    options = FingerprintOptions(timeout=1.5, max_bytes=16384)
    result = await Fingerprinter(SignatureDB.builtin(), options).identify(
        LOOPBACK, hostile_ports[kind]
    )
    _assert_bounded(result, options)
    if kind in ("flood", "huge"):
        assert result.bytes_read == options.max_bytes
        assert result.duration_seconds < 1.0  # the byte limit ends it, not the clock
        assert result.identity.extra == "byte limit reached"
    elif kind == "silent":
        assert result.timed_out and result.bytes_read == 0
    elif kind == "reset":
        assert result.identity.extra == "reset by the server"
        assert result.duration_seconds < 0.5
    else:
        assert result.bytes_read > 0


async def test_a_small_byte_limit_holds(hostile_ports: dict[str, int]) -> None:
    options = FingerprintOptions(max_bytes=1000)
    result = await Fingerprinter(SignatureDB.builtin(), options).identify(
        LOOPBACK, hostile_ports["flood"]
    )
    assert result.bytes_read == 1000
    assert result.identity.banner.startswith("FLOOD FLOOD")


async def test_hostile_ports_do_not_stop_the_others(
    hostile_ports: dict[str, int], http_server: tuple[int, Seen]
) -> None:
    options = FingerprintOptions(timeout=1.5)
    ports = [*hostile_ports.values(), http_server[0]]
    started = time.monotonic()
    results = await Fingerprinter(SignatureDB.builtin(), options).identify_ports(LOOPBACK, ports)
    assert time.monotonic() - started <= options.timeout + SLACK  # concurrently, not in turn
    assert results[http_server[0]].identity.service == "http"
    for port in hostile_ports.values():
        _assert_bounded(results[port], options)


@pytest.mark.skipif(not NMAP_PROBES.exists(), reason="nmap not installed (Debian package nmap)")
async def test_hostile_ports_stay_bounded_with_nmap_rules(
    hostile_ports: dict[str, int], http_server: tuple[int, Seen]
) -> None:
    # About 11,000 more patterns, some of which backtrack badly on a flood: still bounded.
    options = FingerprintOptions(timeout=1.5, nmap_service_probes=NMAP_PROBES)
    fingerprinter = Fingerprinter.load(options)
    ports = [*hostile_ports.values(), http_server[0]]
    started = time.monotonic()
    results = await fingerprinter.identify_ports(LOOPBACK, ports)
    assert time.monotonic() - started <= options.timeout + SLACK
    assert results[http_server[0]].identity.product == "Python http.server"
    for port in hostile_ports.values():
        _assert_bounded(results[port], options)


# -- real HTTP servers ---------------------------------------------------------------------------


async def test_python_http_server_with_the_host_header(http_server: tuple[int, Seen]) -> None:
    port, seen = http_server
    result = await BUILTIN.identify(LOOPBACK, port, server_name="app.example.test")
    identity = result.identity
    assert (identity.service, identity.product) == ("http", "Python http.server")
    assert identity.version == platform.python_version()
    assert identity.tls is None
    assert seen.hosts == [f"app.example.test:{port}"]
    assert identity.banner.startswith("HTTP/1.0 200 OK\\r\\nServer: BaseHTTP/")


def _check_https(
    identity_port: int, certificate: Certificate, seen: Seen, found: ServiceIdentity
) -> None:
    assert (found.service, found.product) == ("https", "Python http.server")
    assert found.version == platform.python_version()
    tls = found.tls
    assert tls is not None
    assert tls.protocol == "TLSv1.3"
    assert tls.sha256 == certificate.sha256
    assert tls.not_after == certificate.not_after
    assert tls.subject == certificate.subject == "O=portscan-exporter lab,CN=app.example.test"
    assert tls.issuer == tls.subject  # self-signed
    assert tls.sans == ("app.example.test", "www.app.example.test", LOOPBACK)
    assert seen.sni == ["app.example.test"]
    assert seen.hosts == [f"app.example.test:{identity_port}"]


async def test_tls_details_of_a_python_https_server(
    https_server: tuple[int, Seen], certificate: Certificate
) -> None:
    port, seen = https_server
    result = await BUILTIN.identify(LOOPBACK, port, server_name="app.example.test")
    _check_https(port, certificate, seen, result.identity)


def test_tls_under_uvloop(https_server: tuple[int, Seen], certificate: Certificate) -> None:
    port, seen = https_server
    result = eventloop.run(BUILTIN.identify(LOOPBACK, port, server_name="app.example.test"))
    _check_https(port, certificate, seen, result.identity)


async def test_no_sni_for_an_address(https_server: tuple[int, Seen]) -> None:
    port, seen = https_server
    result = await BUILTIN.identify(LOOPBACK, port)
    assert result.identity.service == "https"
    assert seen.sni == [None]
    assert seen.hosts == [f"{LOOPBACK}:{port}"]


async def test_same_identity_when_asked_again(
    https_server: tuple[int, Seen], http_server: tuple[int, Seen]
) -> None:
    ports = [https_server[0], http_server[0]]
    rounds = [await BUILTIN.identify_ports(LOOPBACK, ports) for _ in range(3)]
    for port in ports:
        assert len({results[port].identity.fingerprint for results in rounds}) == 1


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_ipv6_address() -> None:
    seen = Seen()

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    server = Server(("::1", 0), type("Handler", (_Handler,), {"seen": seen}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        identity = (await BUILTIN.identify("::1", port)).identity
    finally:
        server.shutdown()
        server.server_close()
    assert (identity.service, identity.product) == ("http", "Python http.server")
    assert seen.hosts == [f"[::1]:{port}"]


# -- engine behaviour ----------------------------------------------------------------------------


async def _slow_greeter(delay: float) -> asyncio.Server:
    """Says an SSH greeting only after `delay`, whatever the client sent meanwhile."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(delay)
        writer.write(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
        await writer.drain()
        await reader.read(1024)
        writer.close()

    return await asyncio.start_server(handle, LOOPBACK, 0)


async def test_a_late_greeting_is_still_recognised() -> None:
    server = await _slow_greeter(0.6)
    port = server.sockets[0].getsockname()[1]
    try:
        options = FingerprintOptions(banner_wait=0.2)
        result = await Fingerprinter(SignatureDB.builtin(), options).identify(LOOPBACK, port)
    finally:
        server.close()
    assert result.probes_sent >= 1  # nothing came in time: a probe went out
    assert (result.identity.service, result.identity.product) == ("ssh", "OpenSSH")


async def test_excluded_ports_get_no_probe() -> None:
    received = bytearray()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read(1024))
        writer.close()

    server = await asyncio.start_server(record, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    db = SignatureDB.from_text(
        f"Exclude {port}\nProbe TCP NULL q||\n"
        "Probe TCP hello q|HELLO\\r\\n|\nrarity 1\nmatch demo m|^OK| p/Demo/\n"
    )
    try:
        options = FingerprintOptions(timeout=1.0, banner_wait=0.2)
        result = await Fingerprinter(db, options).identify(LOOPBACK, port)
    finally:
        server.close()
    assert result.probes_sent == 0 and received == b""
    assert result.identity.service == "unknown"


async def test_refused_port() -> None:
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))  # bound, not listening: connections are refused
    try:
        result = await BUILTIN.identify(LOOPBACK, holder.getsockname()[1])
    finally:
        holder.close()
    assert (result.identity.service, result.identity.extra) == ("unknown", "connection refused")


async def test_one_failing_port_does_not_fail_the_others(http_server: tuple[int, Seen]) -> None:
    broken = 1  # the dialer refuses to handle this one with a programming error

    async def dialer(address: str, port: int) -> socket.socket:
        if port == broken:
            raise RuntimeError("dialer bug")
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (address, port))
        return sock

    fingerprinter = Fingerprinter(SignatureDB.builtin(), dialer=dialer)
    results = await fingerprinter.identify_ports(LOOPBACK, [broken, http_server[0]])
    assert results[broken].identity.service == "unknown"
    assert "dialer bug" in results[broken].identity.extra
    assert results[http_server[0]].identity.product == "Python http.server"


async def test_concurrency_limit(hostile_ports: dict[str, int]) -> None:
    servers = [await hostile.start("silent") for _ in range(3)]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    options = FingerprintOptions(timeout=0.3, banner_wait=0.1)
    fingerprinter = Fingerprinter(SignatureDB.builtin(), options)
    try:
        started = time.monotonic()
        await fingerprinter.identify_ports(LOOPBACK, ports, limiter=asyncio.Semaphore(1))
        one_at_a_time = time.monotonic() - started
        started = time.monotonic()
        await fingerprinter.identify_ports(LOOPBACK, ports)
        together = time.monotonic() - started
    finally:
        for server in servers:
            server.close()
    assert one_at_a_time >= 3 * options.timeout - 0.05
    assert together < 2 * options.timeout


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": 0}, {"max_bytes": 0}, {"concurrency": 0}, {"banner_wait": -1}, {"intensity": 10}],
)
def test_options_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FingerprintOptions(**kwargs)  # type: ignore[arg-type]


def test_nmap_path_is_optional(tmp_path: Path) -> None:
    assert Fingerprinter.load(FingerprintOptions()).db is SignatureDB.builtin()
    with pytest.raises(OSError):
        Fingerprinter.load(FingerprintOptions(nmap_service_probes=tmp_path / "missing"))


def test_certificate_names_are_sanitized() -> None:
    """Subject, issuer and SANs are the remote side's text: no control characters pass."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from exporter.fingerprint.tls import certificate_info

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil\n\x1b[31mred\x07")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("a\nb\x1b[2J")]), False)
        .sign(key, hashes.SHA256())
    )
    info = certificate_info(cert.public_bytes(serialization.Encoding.DER), "TLSv1.3")
    for text in (info.subject, info.issuer, *info.sans):
        assert text.isprintable(), text
    assert info.subject == "CN=evil\\n\\x1b[31mred\\x07"
    assert info.sans == ("a\\nb\\x1b[2J",)


# -- identify_scanned: what the daemon and the scan command call ---------------------------------


def _scan(host: str, address: str, open_ports: list[int], error: str | None = None) -> ScanResult:
    return ScanResult(
        host=host,
        address=address,
        started=time.time(),
        duration_seconds=0.01,
        ports_scanned=len(open_ports),
        answered=error is None,
        open=tuple(open_ports),
        error=error,
    )


async def test_identify_scanned_sends_the_scanned_name(
    https_server: tuple[int, Seen], http_server: tuple[int, Seen]
) -> None:
    ports = [https_server[0], http_server[0]]
    services = await BUILTIN.identify_scanned(_scan("app.example.test", LOOPBACK, ports))
    assert sorted(services) == sorted(ports)
    assert services[https_server[0]].service == "https"
    assert services[http_server[0]].product == "Python http.server"
    assert https_server[1].sni == ["app.example.test"]
    assert http_server[1].hosts == [f"app.example.test:{http_server[0]}"]


async def test_identify_scanned_has_nothing_to_do_for_a_failed_or_empty_scan() -> None:
    assert await BUILTIN.identify_scanned(_scan(LOOPBACK, LOOPBACK, [])) == {}
    failed = _scan(LOOPBACK, LOOPBACK, [80], error="name does not resolve")
    assert await BUILTIN.identify_scanned(failed) == {}
