"""STARTTLS: read the certificate of mail and file servers that upgrade in-band.

After a server's greeting names it as SMTP, IMAP, POP3 or FTP, the engine may ask it to switch
to TLS on the same connection, so certificate details (and expiry) are known for those ports
too. Each protocol is one row of `UPGRADES`: how to list capabilities, how to see that TLS is
offered, the command that starts it and the reply that accepts it. Nothing is sent when the
server does not offer TLS, and no credentials are ever sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..model import TLSInfo
from .connection import BudgetExhausted, Connection


@dataclass(frozen=True, slots=True)
class Upgrade:
    service: str
    ask: bytes  # lists the capabilities ("" when the greeting already did)
    listed: re.Pattern[bytes]  # the end of the capability list
    offered: re.Pattern[bytes]  # TLS is among the capabilities
    command: bytes
    replied: re.Pattern[bytes]  # the end of the reply to `command`
    accepted: re.Pattern[bytes]  # that reply says "go ahead"


_FINAL_REPLY_LINE = re.compile(rb"(?m)^\d{3} [^\n]*\n")
_LINE = re.compile(rb"\n")

UPGRADES = {
    "smtp": Upgrade(
        service="smtp",
        ask=b"EHLO portscan-exporter.invalid\r\n",
        listed=_FINAL_REPLY_LINE,
        offered=re.compile(rb"(?mi)^250[ -]STARTTLS\b"),
        command=b"STARTTLS\r\n",
        replied=_FINAL_REPLY_LINE,
        accepted=re.compile(rb"^220[ \r\n]"),
    ),
    "imap": Upgrade(
        service="imap",
        ask=b"a001 CAPABILITY\r\n",
        listed=re.compile(rb"(?m)^a001 [^\n]*\n"),
        offered=re.compile(rb"(?i)\bSTARTTLS\b"),
        command=b"a002 STARTTLS\r\n",
        replied=re.compile(rb"(?m)^a002 [^\n]*\n"),
        accepted=re.compile(rb"(?m)^a002 OK\b"),
    ),
    "pop3": Upgrade(
        service="pop3",
        ask=b"CAPA\r\n",
        listed=re.compile(rb"(?m)^(?:\.\r?\n|-ERR[^\n]*\n)"),
        offered=re.compile(rb"(?mi)^STLS\b"),
        command=b"STLS\r\n",
        replied=_LINE,
        accepted=re.compile(rb"^\+OK"),
    ),
    "ftp": Upgrade(
        service="ftp",
        ask=b"FEAT\r\n",
        listed=_FINAL_REPLY_LINE,
        offered=re.compile(rb"(?mi)^ ?AUTH\b[^\r\n]*\bTLS\b"),
        command=b"AUTH TLS\r\n",
        replied=_FINAL_REPLY_LINE,
        accepted=re.compile(rb"^234[ -]"),
    ),
}

_IMAP_GREETING_CAPABILITIES = re.compile(rb"^\* OK \[CAPABILITY ([^\]\r\n]*)\]")


async def upgrade(
    conn: Connection, service: str, greeting: bytes, server_name: str | None, wait: float
) -> TLSInfo | None:
    """Switch `conn` (which has only received `greeting`) to TLS if the server offers it.

    Returns the session's TLS details, or None when TLS is not offered or the server refuses.
    Raises `ssl.SSLError`/`OSError` when the handshake itself fails.
    """
    plan = UPGRADES.get(service)
    if plan is None:
        return None
    capabilities = b""
    if service == "imap":
        listed = _IMAP_GREETING_CAPABILITIES.match(greeting)
        capabilities = listed.group(1) if listed else b""
    if not capabilities:
        await conn.send(plan.ask)
        capabilities = await _reply(conn, plan.listed, wait)
    if not plan.offered.search(capabilities):
        return None
    await conn.send(plan.command)
    if not plan.accepted.search(await _reply(conn, plan.replied, wait)):
        return None
    return await conn.start_tls(server_name)


async def _reply(conn: Connection, end: re.Pattern[bytes], wait: float) -> bytes:
    try:
        response = await conn.read(wait, done=lambda data: end.search(data) is not None)
    except BudgetExhausted:
        return b""
    return response.data
