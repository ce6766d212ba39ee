"""Real Debian daemons on their standard ports, inside a private network namespace.

`ServiceLab` starts nginx, OpenSSH, Postfix, Dovecot, vsftpd, MariaDB, PostgreSQL, Redis and
memcached with private configuration and data in a temporary directory, each listening on the
namespace's own 127.0.0.1, and stops them all (and deletes the namespace) on exit. Both the
test suite and `bench/fingerprint_vs_nmap.py` use it.

Daemons whose binary is missing are left out (`skipped` says why); a daemon that is installed
but does not come up is listed in `failed` with the end of its log, so a test can say exactly
what broke.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.lab import NetNS, missing_root_reason

ADDRESS = "127.0.0.1"
SERVER_NAME = "lab.example.test"
HOSTILE_SCRIPT = Path(__file__).with_name("hostile.py")
HOSTILE_PORTS = {"flood": 7001, "silent": 7002, "garbage": 7003, "huge": 7004, "reset": 7005}


@dataclass(frozen=True, slots=True)
class Certificate:
    """The lab's certificate as `openssl x509` reads it (independent of our parser)."""

    pem: Path
    key: Path
    sha256: str
    not_after: float
    subject: str


@dataclass(frozen=True, slots=True)
class Expected:
    """What should be identified on a port, derived from the installed packages."""

    service: str
    product: str
    version: str  # "" when the service does not disclose it
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Daemon:
    name: str
    binary: str
    package: str
    ports: tuple[int, ...]
    start: Callable[[ServiceLab], None]


def make_certificate(directory: Path, name: str, address: str) -> Certificate:
    """A self-signed certificate for `name` (and `address`) made by `openssl`, with the facts
    `openssl x509` reads back from it."""
    pem, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(pem), "-days", "30",
            "-subj", f"/CN={name}/O=portscan-exporter lab",
            "-addext", f"subjectAltName=DNS:{name},DNS:www.{name},IP:{address}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    key.chmod(0o644)  # read by unprivileged daemon processes in a private lab
    facts = subprocess.run(
        ["openssl", "x509", "-in", str(pem), "-noout", "-fingerprint", "-sha256",
         "-enddate", "-subject", "-nameopt", "RFC2253"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout  # fmt: skip
    values = dict(line.split("=", 1) for line in facts.splitlines() if "=" in line)
    fingerprint = next(v for k, v in values.items() if k.lower().endswith("fingerprint"))
    not_after = calendar.timegm(time.strptime(values["notAfter"], "%b %d %H:%M:%S %Y %Z"))
    return Certificate(
        pem=pem,
        key=key,
        sha256=fingerprint.replace(":", "").lower(),
        not_after=float(not_after),
        subject=values["subject"],
    )


def _installed(binary: str) -> bool:
    if "*" in binary:
        return any(Path("/").glob(binary.lstrip("/")))
    return shutil.which(binary) is not None


def upstream_version(package: str) -> str:
    """The upstream part of an installed Debian package's version ("1:9.2p1-2+deb12u1" ->
    "9.2p1"), or "" when it is not installed."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    version = result.stdout.strip()
    if result.returncode != 0 or not version:
        return ""
    version = version.split(":", 1)[-1]
    return version.rsplit("-", 1)[0] if "-" in version else version


class ServiceLab:
    """Context manager: the daemons of `DAEMONS` (or those named in `only`) running."""

    def __init__(self, only: set[str] | None = None, *, hostile: bool = False) -> None:
        self.only = only
        self.hostile = hostile
        self.root = Path()  # a private directory, made on entry
        self.ns = NetNS(prefix="fp")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[int, str] = {}
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.cert: Certificate | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> ServiceLab:
        reason = missing_root_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self.root = Path(tempfile.mkdtemp(prefix="fp-lab-"))
        try:
            # Daemons drop privileges (postgres, nobody, dovenull) and must reach their files.
            self.root.chmod(0o755)
            self.ns.__enter__()
            self.cert = self._make_certificate()
            for daemon in DAEMONS:
                if self.only is not None and daemon.name not in self.only:
                    continue
                if not _installed(daemon.binary):
                    self.skipped[daemon.name] = (
                        f"{daemon.binary} not installed (Debian package {daemon.package})"
                    )
                    continue
                try:
                    daemon.start(self)
                except (OSError, subprocess.SubprocessError) as exc:
                    self.failed[daemon.name] = f"could not start: {exc}"
                    continue
                for port in daemon.ports:
                    self.ports[port] = daemon.name
            if self.hostile:
                self._spawn(
                    "hostile",
                    sys.executable,
                    str(HOSTILE_SCRIPT),
                    *(f"{kind}={port}" for kind, port in HOSTILE_PORTS.items()),
                )
            self._wait_ready(deadline=time.monotonic() + 60)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.ns.__exit__(None, None, None)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers for daemons ------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def write(self, name: str, text: str) -> Path:
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return target

    def _spawn(self, name: str, *cmd: str) -> None:
        log = self.path(f"{name}.log").open("ab")
        try:
            self.processes[name] = self.ns.spawn(
                *cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()

    def log_tail(self, name: str, lines: int = 15) -> str:
        logs = sorted(self.root.glob(f"{name}*.log"))
        text = "\n".join(log.read_text(errors="replace") for log in logs)
        return "\n".join(text.splitlines()[-lines:])

    def _make_certificate(self) -> Certificate:
        return make_certificate(self.root, SERVER_NAME, ADDRESS)

    def connect(self, port: int, timeout: float = 1.0) -> socket.socket:
        """A blocking connection from inside the namespace."""
        return self.ns.call(socket.create_connection, (ADDRESS, port), timeout)

    def _wait_ready(self, deadline: float) -> None:
        pending = dict(self.ports)
        if self.hostile:
            pending.update({port: "hostile" for port in HOSTILE_PORTS.values()})
        while pending and time.monotonic() < deadline:
            for port, name in list(pending.items()):
                proc = self.processes.get(name)
                if proc is not None and proc.poll() is not None:
                    pending.pop(port)
                    self.failed[name] = f"exited with {proc.returncode}:\n{self.log_tail(name)}"
                    continue
                try:
                    self.connect(port, timeout=0.5).close()
                except OSError:
                    continue
                pending.pop(port)
            if pending:
                time.sleep(0.1)
        for port, name in pending.items():
            self.failed.setdefault(name, f"port {port} not listening after 60 s:\n"
                                   f"{self.log_tail(name)}")  # fmt: skip
        for port in [p for p, name in self.ports.items() if name in self.failed]:
            del self.ports[port]

    # -- what tests and the benchmark use -------------------------------------------------------

    async def dial(self, address: str, port: int) -> socket.socket:
        """`fingerprint.Dialer` connecting from inside the namespace.

        Only the socket is created in a thread that joined the namespace (a socket belongs
        to the namespace it was created in); the connect runs on the event loop."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = self.ns.call(socket.socket, family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def expected(self) -> dict[int, Expected]:
        """Expected identity of every running lab port."""
        versions = {
            "nginx": upstream_version("nginx"),
            "ssh": upstream_version("openssh-server"),
            "redis": upstream_version("redis-server"),
            "memcached": upstream_version("memcached"),
            "mariadb": upstream_version("mariadb-server"),
            "vsftpd": upstream_version("vsftpd"),
        }
        table = {
            21: Expected("ftp", "vsftpd", versions["vsftpd"]),
            22: Expected("ssh", "OpenSSH", versions["ssh"]),
            25: Expected("smtp", "Postfix smtpd", ""),
            80: Expected("http", "nginx", versions["nginx"]),
            110: Expected("pop3", "Dovecot pop3d", ""),
            143: Expected("imap", "Dovecot imapd", ""),
            443: Expected("https", "nginx", versions["nginx"], tls=True),
            465: Expected("smtps", "Postfix smtpd", "", tls=True),
            993: Expected("imaps", "Dovecot imapd", "", tls=True),
            995: Expected("pop3s", "Dovecot pop3d", "", tls=True),
            3306: Expected("mysql", "MariaDB", versions["mariadb"]),
            5432: Expected("postgresql", "PostgreSQL", ""),
            6379: Expected("redis", "Redis", versions["redis"]),
            8080: Expected("http", "nginx", versions["nginx"]),
            11211: Expected("memcached", "Memcached", versions["memcached"]),
        }
        return {port: table[port] for port in sorted(self.ports)}


# -- the daemons --------------------------------------------------------------------------------


def _nginx(lab: ServiceLab) -> None:
    assert lab.cert is not None
    temp = lab.path("nginx")
    temp.mkdir()
    conf = lab.write(
        "nginx.conf",
        f"""
worker_processes 1;
pid {lab.path("nginx.pid")};
error_log {lab.path("nginx-error.log")};
events {{ worker_connections 128; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen {ADDRESS}:80;
        listen {ADDRESS}:8080;
        location / {{ return 200 "lab\\n"; }}
    }}
    server {{
        listen {ADDRESS}:443 ssl;
        server_name {SERVER_NAME};
        ssl_certificate {lab.cert.pem};
        ssl_certificate_key {lab.cert.key};
        location / {{ return 200 "lab\\n"; }}
    }}
}}
""",
    )
    lab._spawn(
        "nginx",
        "nginx", "-e", str(lab.path("nginx-error.log")),
        "-g", "daemon off;", "-c", str(conf),
    )  # fmt: skip


def _sshd(lab: ServiceLab) -> None:
    key = lab.path("ssh_host_ed25519_key")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    conf = lab.write(
        "sshd_config",
        f"Port 22\nListenAddress {ADDRESS}\nHostKey {key}\n"
        f"PidFile {lab.path('sshd.pid')}\nUsePAM no\n",
    )
    # sshd insists on its privilege-separation directory /run/sshd. `ip netns exec` already
    # runs us in a private mount namespace, so a tmpfs on /run there leaves the host alone.
    lab._spawn(
        "sshd",
        "sh", "-c",
        'mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 755 /run/sshd && exec "$@"',
        "sh", "/usr/sbin/sshd", "-D", "-e", "-f", str(conf),
    )  # fmt: skip


def _redis(lab: ServiceLab) -> None:
    lab._spawn(
        "redis",
        "redis-server", "--port", "6379", "--bind", ADDRESS, "--dir", str(lab.root),
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "",
    )  # fmt: skip


def _memcached(lab: ServiceLab) -> None:
    lab._spawn("memcached", "memcached", "-l", ADDRESS, "-p", "11211", "-U", "0", "-u", "nobody")


def _postgresql(lab: ServiceLab) -> None:
    bindir = Path("/usr/lib/postgresql")
    versions = sorted((p for p in bindir.glob("*/bin/postgres")), key=lambda p: p.parts)
    if not versions:
        raise OSError("no /usr/lib/postgresql/*/bin/postgres")
    postgres = versions[-1]
    data, sockets = lab.path("pg"), lab.path("pgsock")
    for directory in (data, sockets):
        directory.mkdir()
        shutil.chown(directory, "postgres", "postgres")
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    subprocess.run(
        [*as_postgres, str(postgres.with_name("initdb")), "-D", str(data), "--no-sync",
         "--auth-host=scram-sha-256", "--auth-local=peer", "-U", "postgres"],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    lab._spawn(
        "postgresql",
        *as_postgres, str(postgres), "-D", str(data),
        "-c", f"listen_addresses={ADDRESS}", "-c", "port=5432",
        "-c", f"unix_socket_directories={sockets}", "-c", "fsync=off",
    )  # fmt: skip


def _mariadb(lab: ServiceLab) -> None:
    data = lab.path("mysql")
    subprocess.run(
        ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
         "--auth-root-authentication-method=socket", "--skip-test-db"],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    # No --skip-name-resolve: 127.0.0.1 must resolve to "localhost" (from /etc/hosts) to match
    # the root@localhost account, or the server refuses us before its greeting.
    lab._spawn(
        "mariadb",
        "mariadbd", "--no-defaults", f"--datadir={data}",
        f"--socket={lab.path('mysql.sock')}", f"--pid-file={lab.path('mysql.pid')}",
        "--port=3306", f"--bind-address={ADDRESS}", "--user=root", "--skip-log-bin",
        "--innodb-buffer-pool-size=16M", f"--log-error={lab.path('mariadb-error.log')}",
    )  # fmt: skip


def _postfix(lab: ServiceLab) -> None:
    assert lab.cert is not None
    config, spool, data = lab.path("postfix"), lab.path("postfix-spool"), lab.path("postfix-data")
    for directory in (config, spool, data):
        directory.mkdir()
    shutil.chown(data, "postfix")
    (config / "main.cf").write_text(
        f"""compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
myhostname = {SERVER_NAME}
mydestination =
inet_interfaces = {ADDRESS}
inet_protocols = ipv4
smtpd_banner = $myhostname ESMTP $mail_name (Debian/GNU)
maillog_file_prefixes = {lab.root}
maillog_file = {lab.path("postfix.log")}
smtpd_tls_cert_file = {lab.cert.pem}
smtpd_tls_key_file = {lab.cert.key}
smtpd_tls_security_level = may
alias_maps =
alias_database =
biff = no
"""
    )
    # Unchrooted, and only the services an SMTP greeting and STARTTLS need.
    (config / "master.cf").write_text(
        """smtp      inet  n       -       n       -       -       smtpd
465       inet  n       -       n       -       -       smtpd -o smtpd_tls_wrappermode=yes
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
postlog   unix-dgram n  -       n       -       1       postlogd
"""
    )
    # Creates the queue directories with the ownership Postfix expects.
    subprocess.run(
        ["postfix", "-c", str(config), "check"], check=True, capture_output=True, timeout=60
    )
    lab._spawn("postfix", "/usr/lib/postfix/sbin/master", "-c", str(config), "-d")


def _dovecot(lab: ServiceLab) -> None:
    assert lab.cert is not None
    for directory in ("dovecot-run", "dovecot-state", "mail"):
        lab.path(directory).mkdir()
    conf = lab.write(
        "dovecot.conf",
        f"""base_dir = {lab.path("dovecot-run")}
state_dir = {lab.path("dovecot-state")}
instance_name = dovecot-{lab.ns.name}
protocols = imap pop3
listen = {ADDRESS}
log_path = {lab.path("dovecot.log")}
ssl = yes
ssl_cert = <{lab.cert.pem}
ssl_key = <{lab.cert.key}
mail_location = maildir:{lab.path("mail")}/%u
passdb {{
  driver = static
  args = password=lab-only-{os.getpid()}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={lab.path("mail")}/%u
}}
service imap-login {{
  inet_listener imap {{
    port = 143
  }}
  inet_listener imaps {{
    port = 993
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 110
  }}
  inet_listener pop3s {{
    port = 995
    ssl = yes
  }}
}}
""",
    )
    lab._spawn("dovecot", "dovecot", "-F", "-c", str(conf))


def _vsftpd(lab: ServiceLab) -> None:
    assert lab.cert is not None
    empty = lab.path("vsftpd-empty")
    empty.mkdir()
    conf = lab.write(
        "vsftpd.conf",
        f"""listen=YES
listen_ipv6=NO
background=NO
listen_address={ADDRESS}
listen_port=21
anonymous_enable=NO
local_enable=YES
pam_service_name=vsftpd
secure_chroot_dir={empty}
seccomp_sandbox=NO
xferlog_enable=NO
ssl_enable=YES
rsa_cert_file={lab.cert.pem}
rsa_private_key_file={lab.cert.key}
vsftpd_log_file={lab.path("vsftpd-transfers.log")}
""",
    )
    lab._spawn("vsftpd", "vsftpd", str(conf))


DAEMONS = (
    Daemon("nginx", "nginx", "nginx", (80, 443, 8080), _nginx),
    Daemon("sshd", "/usr/sbin/sshd", "openssh-server", (22,), _sshd),
    Daemon("redis", "redis-server", "redis-server", (6379,), _redis),
    Daemon("memcached", "memcached", "memcached", (11211,), _memcached),
    Daemon("postgresql", "/usr/lib/postgresql/*/bin/postgres", "postgresql", (5432,), _postgresql),
    Daemon("mariadb", "mariadbd", "mariadb-server", (3306,), _mariadb),
    Daemon("postfix", "/usr/lib/postfix/sbin/master", "postfix", (25, 465), _postfix),
    Daemon("dovecot", "dovecot", "dovecot-imapd", (110, 143, 993, 995), _dovecot),
    Daemon("vsftpd", "vsftpd", "vsftpd", (21,), _vsftpd),
)


def unavailable_reason() -> str | None:
    """Why no lab can be built here (not root, no `ip`), or None."""
    return missing_root_reason()


__all__ = [
    "ADDRESS",
    "DAEMONS",
    "HOSTILE_PORTS",
    "SERVER_NAME",
    "Certificate",
    "Expected",
    "ServiceLab",
    "make_certificate",
    "unavailable_reason",
    "upstream_version",
]
