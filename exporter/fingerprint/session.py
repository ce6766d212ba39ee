"""The procedure that identifies the service on one open TCP port.

Theory of operation, for one port:

1. Connect and wait briefly for a server-first banner (longer on ports where servers are
   known to speak first, such as 22, 25 or 3306). A banner that matches a rule usually ends
   the search; for SMTP, IMAP, POP3 and FTP the same connection may then be upgraded with
   STARTTLS to read the certificate.
2. If nothing came, send probes in the order `SignatureDB.plan` gives: first those meant for
   this port, then the common ones. The first probe reuses the silent banner connection; the
   others each get a fresh connection, so one confused server state never leaks into the next
   answer. Every answer is matched as it arrives; a hard match stops.
3. A TLS handshake is one of those probes (first on ports like 443 and 993, or as soon as an
   answer says "this is TLS"). Once TLS is up, steps 1 and 2 run again inside it, and the
   service is named for TLS (http -> https, imap -> imaps).
4. Everything above runs under one deadline and one byte allowance per port (see
   `connection.Budget`); when either runs out, the best answer so far is the result.

Nothing here raises for a misbehaving port: the result is then an "unknown" identity whose
`extra` says why, and the raw banner (sanitized) for the timeline. `engine.Fingerprinter` is
what callers hold; it runs one `Session` per port.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..model import UNKNOWN_SERVICE, ServiceIdentity, TLSInfo
from . import starttls
from .connection import Budget, BudgetExhausted, Connection, Dialer, Response
from .probefile import Found, Probe
from .sanitize import sanitize
from .signatures import NULL_PROBE, SignatureDB
from .tls import inner_service, tls_service_name, wants_tls

if TYPE_CHECKING:
    from .engine import FingerprintOptions

BANNER_LIMIT = 256
EXTRA_LIMIT = 160
# Once an answer has started, how long a pause means it is complete.
SETTLE_SECONDS = 0.3
STARTTLS_WAIT = 3.0
TLS_HANDSHAKE_WAIT = 3.0  # when the database has no TLS probe to say otherwise


def _authority(host: str, port: int, inside_tls: bool) -> str:
    """Host header value: the name, with the port unless it is the scheme's default."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    elif not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = sanitize(host.encode("utf-8", "replace").decode("ascii", "replace"), 253)
    default = 443 if inside_tls else 80
    return host if port == default else f"{host}:{port}"


@dataclass(slots=True)
class _Best:
    """The best rule match seen so far on one layer (plain, or inside TLS)."""

    found: Found | None = None
    data: bytes = b""

    def offer(self, found: Found | None, data: bytes) -> None:
        if found is None:
            return
        if self.found is None or (self.found.soft and not found.soft):
            self.found, self.data = found, data

    @property
    def hard(self) -> bool:
        return self.found is not None and not self.found.soft


@dataclass
class Session:
    """One port's identification: what was tried, and the best answers so far."""

    address: str
    port: int
    db: SignatureDB
    options: FingerprintOptions
    server_name: str | None
    dialer: Dialer
    budget: Budget
    plain: _Best = field(default_factory=_Best)
    inner: _Best = field(default_factory=_Best)
    tls: TLSInfo | None = None  # the port itself speaks TLS
    starttls: TLSInfo | None = None  # upgraded in-band
    first_data: bytes = b""
    note: str = ""
    tried_tls: bool = False
    connections: list[Connection] = field(default_factory=list)

    # -- plumbing ---------------------------------------------------------------------------

    async def connect(self) -> Connection:
        conn = await Connection.open(self.dialer, self.address, self.port, self.budget)
        self.connections.append(conn)
        return conn

    async def reconnect(self) -> Connection | None:
        """A fresh connection for the next probe, or None once the port stops accepting."""
        try:
            return await self.connect()
        except OSError as exc:
            self.note = self.note or f"reconnect failed: {exc.strerror or exc}"
            return None

    def wait(self, seconds: float) -> float:
        return max(0.0, min(seconds, self.budget.remaining()))

    def consider(self, probe_name: str, data: bytes, *, inside_tls: bool) -> Found | None:
        if not data:
            return None
        if not self.first_data:
            self.first_data = data
        found = self.db.match(probe_name, data)
        (self.inner if inside_tls else self.plain).offer(found, data)
        return found

    async def exchange(self, conn: Connection, probe: Probe, *, inside_tls: bool) -> Response:
        """Send `probe` on `conn` and read the answer, matching as it arrives."""
        host = self.server_name or self.address
        self.budget.probes_sent += 1
        try:
            await conn.send(probe.render(_authority(host, self.port, inside_tls)))
        except (ConnectionError, OSError):
            return Response(b"", closed=True, reset=True)
        try:
            response = await conn.read(
                self.wait(probe.wait), done=self.recognised(probe.name), settle=SETTLE_SECONDS
            )
        except BudgetExhausted as exc:
            self.consider(probe.name, exc.args[0], inside_tls=inside_tls)
            raise
        self.consider(probe.name, response.data, inside_tls=inside_tls)
        return response

    def recognised(self, probe_name: str) -> Callable[[bytes], bool]:
        """A `done` test for reads: the data so far gets a hard match."""

        def complete(data: bytes) -> bool:
            found = self.db.match(probe_name, data, quick=True)
            return found is not None and not found.soft

        return complete

    def worth_sending(self, probe: Probe, best: _Best) -> bool:
        """After a soft match, only probes with rules for that service can still help."""
        if best.found is None:
            return True
        return best.found.service in self.db.services_probed_by(probe)

    # -- the procedure ----------------------------------------------------------------------

    async def run_within_limits(self) -> bool:
        """`run` under the budget's deadline and byte allowance; True when time ran out.

        Every connection is closed on the way out, whichever way that is.
        """
        try:
            async with asyncio.timeout_at(self.budget.deadline):
                await self.run()
        except TimeoutError:
            self.note = self.note or "no answer within the time limit"
            return True
        except BudgetExhausted:
            self.note = self.note or "byte limit reached"
        finally:
            for conn in self.connections:
                conn.abort()
        return False

    async def run(self) -> None:
        try:
            conn = await self.connect()
        except ConnectionRefusedError:
            self.note = "connection refused"
            return
        except ConnectionResetError:
            self.note = "reset by the server"
            return
        except OSError as exc:
            self.note = f"connect failed: {exc.strerror or exc}"
            return
        wait = self.db.banner_wait(self.port, inside_tls=False, default=self.options.banner_wait)
        try:
            banner = await conn.read(
                self.wait(wait), done=self.recognised(NULL_PROBE), settle=SETTLE_SECONDS
            )
        except BudgetExhausted as exc:
            self.consider(NULL_PROBE, exc.args[0], inside_tls=False)
            raise
        found = self.consider(NULL_PROBE, banner.data, inside_tls=False)
        if not banner.data and banner.closed:
            self.note = "reset by the server" if banner.reset else "closed by the server"
            return
        if found is not None and self.options.starttls and not banner.closed:
            await self.try_starttls(conn, found.service, banner.data)
        if self.plain.hard:
            return
        spare = None if conn.received or banner.closed or conn.tls else conn
        if spare is None:
            conn.abort()
        await self.probe_plain(spare)

    async def try_starttls(self, conn: Connection, service: str, greeting: bytes) -> None:
        if service not in starttls.UPGRADES:
            return
        try:
            async with asyncio.timeout(self.wait(STARTTLS_WAIT)):
                self.starttls = await starttls.upgrade(
                    conn, service, greeting, self.server_name, self.wait(STARTTLS_WAIT)
                )
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError):
            self.starttls = None

    async def probe_plain(self, spare: Connection | None) -> None:
        queue = self.db.plan(self.port, self.options.intensity)
        while queue:
            probe = queue.pop(0)
            if probe.tls_handshake:
                if self.tried_tls:
                    continue
                if await self.try_tls(spare):
                    return
                spare = None  # used up by the failed handshake
                continue
            if not self.worth_sending(probe, self.plain):
                continue
            conn = spare or await self.reconnect()
            spare = None
            if conn is None:
                return
            await self.exchange(conn, probe, inside_tls=False)
            conn.abort()
            if self.plain.hard:
                return
            hint = self.plain.found
            if (
                hint is not None
                and wants_tls(hint.service)
                and not self.tried_tls
                and await self.try_tls(None)
            ):
                return

    async def try_tls(self, spare: Connection | None) -> bool:
        """Handshake, then identify inside. True when the port speaks TLS."""
        self.tried_tls = True
        conn = spare or await self.reconnect()
        if conn is None:
            return False
        self.budget.probes_sent += 1
        self.tls = await self.handshake(conn)
        if self.tls is None:
            return False
        await self.identify_inside(conn)
        return True

    async def handshake(self, conn: Connection) -> TLSInfo | None:
        tls_probe = next((p for p in self.db.probes if p.tls_handshake), None)
        wait = tls_probe.wait if tls_probe is not None else TLS_HANDSHAKE_WAIT
        try:
            async with asyncio.timeout(self.wait(wait)):
                return await conn.start_tls(self.server_name)
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError):
            conn.abort()
            return None

    async def identify_inside(self, conn: Connection) -> None:
        wait = self.db.banner_wait(self.port, inside_tls=True, default=self.options.banner_wait)
        try:
            banner = await conn.read(
                self.wait(wait), done=self.recognised(NULL_PROBE), settle=SETTLE_SECONDS
            )
        except BudgetExhausted as exc:
            self.consider(NULL_PROBE, exc.args[0], inside_tls=True)
            raise
        self.consider(NULL_PROBE, banner.data, inside_tls=True)
        if self.inner.hard or (banner.closed and not banner.data):
            return
        spare: Connection | None = None if conn.received or banner.closed else conn
        if spare is None:
            conn.abort()
        for probe in self.db.inner_plan(self.port, self.options.intensity):
            if not self.worth_sending(probe, self.inner):
                continue
            if spare is None:
                spare = await self.reconnect()
                if spare is None or await self.handshake(spare) is None:
                    return
            conn, spare = spare, None
            await self.exchange(conn, probe, inside_tls=True)
            conn.abort()
            if self.inner.hard:
                return

    # -- the result -------------------------------------------------------------------------

    def identity(self) -> ServiceIdentity:
        if self.tls is not None:
            found = self.inner.found
            data = self.inner.data
            if found is not None:
                service = tls_service_name(
                    inner_service(found.service) if wants_tls(found.service) else found.service
                )
            else:
                hint = self.plain.found
                inner = inner_service(hint.service) if hint and wants_tls(hint.service) else ""
                service = tls_service_name(inner)
            tls: TLSInfo | None = self.tls
        else:
            found, data = self.plain.found, self.plain.data
            service = found.service if found is not None else UNKNOWN_SERVICE.service
            if found is not None and wants_tls(found.service):
                service = tls_service_name(inner_service(found.service))
            tls = self.starttls
        banner = sanitize(data or self.first_data, BANNER_LIMIT)
        if found is None:
            if not self.note and self.first_data:
                self.note = "answer not recognised"
            return ServiceIdentity(
                service=service, extra=sanitize(self.note, EXTRA_LIMIT), tls=tls, banner=banner
            )
        return ServiceIdentity(
            service=service,
            product=found.product,
            version=found.version,
            extra=found.extra,
            tls=tls,
            banner=banner,
        )
