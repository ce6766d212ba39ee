"""Serving the application: where to listen, IPv4 and IPv6 on one socket, and TLS whose
certificate files may be renewed while the exporter runs.

Listen addresses are written as exporter-toolkit writes them (`:9100`, `host:port`,
`[v6]:port`); every failure to listen becomes a `ListenError` whose text is for the operator.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import ssl
from typing import Any

import structlog
from aiohttp import web

from exporter.web.config_source import WebConfigSource
from exporter.web.connections import (
    HEADER_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    MAX_CONNECTIONS,
    BoundedAppRunner,
)
from exporter.web.guard import GUARD
from exporter.web.webconfig import TLSServerConfig, WebConfig, WebConfigError

__all__ = ["ListenError", "parse_listen_address", "start_server"]

SHUTDOWN_TIMEOUT_SECONDS = 5.0

log = structlog.get_logger("portscan_exporter")


class ListenError(OSError):
    """The server cannot listen where it was told to; `str()` is meant for the operator."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """`host:port`, `[v6]:port` or `:port` (every interface) -> (host or None, port)."""
    text = address.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ListenError(
            errno.EINVAL,
            f"invalid listen address {address!r}: expected host:port, [ipv6]:port or :port",
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenError(
            errno.EINVAL, f"invalid listen address {address!r}: write IPv6 addresses as [addr]:port"
        )
    return (host or None), int(port_text)


def _dual_stack_socket(port: int, *, v6_only_host: bool) -> socket.socket:
    """One socket for IPv6 and IPv4 (as Go listens on ":port" and "[::]:port")."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        if v6_only_host:
            raise
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        family_v4 = True
    else:
        family_v4 = False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family_v4:
            sock.bind(("0.0.0.0", port))
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _listen_error(address: str, exc: OSError) -> ListenError:
    if isinstance(exc, socket.gaierror):
        return ListenError(exc.errno, f"cannot listen on {address}: cannot resolve the host name")
    reasons = {
        errno.EADDRINUSE: "the address is already in use (is another exporter running?)",
        errno.EADDRNOTAVAIL: "the address is not assigned to this machine",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return ListenError(exc.errno, f"cannot listen on {address}: {reason}")


def _tls_settings(tls: TLSServerConfig) -> TLSServerConfig:
    """The part of the TLS config a running listener cannot change (all but the files)."""
    return dataclasses.replace(
        tls, cert_file=None, key_file=None, cert=None, key=None, client_ca_file=None, client_ca=None
    )


def _serving_context(source: WebConfigSource) -> ssl.SSLContext:
    """The listener's TLS context; each new connection gets the certificate files' content
    as they are now, so a renewed certificate is served without a restart.

    OpenSSL switches the certificate of a connection in the SNI callback (called with or
    without SNI) but not its verification settings: versions, ciphers and client auth apply
    at restart, which is logged when the file changes them.
    """
    context = source.ssl_context()
    config = source.current().tls_server_config
    if context is None or config is None:
        raise WebConfigError("no TLS configured", path=str(source.path))
    settings = _tls_settings(config)
    state: dict[str, str | None] = {"error": None, "warned": None}

    def choose(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> int | None:
        try:
            fresh = source.ssl_context()
            tls = source.current().tls_server_config
        except WebConfigError as exc:
            if state["error"] != str(exc):
                state["error"] = str(exc)
                log.error("TLS config invalid, refusing TLS connections", error=str(exc))
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        state["error"] = None
        if fresh is None or tls is None:
            if state["warned"] != "off":
                state["warned"] = "off"
                log.warning("TLS was removed from the web config; it stays on until restart")
            return None
        if _tls_settings(tls) != settings and state["warned"] != repr(tls):
            state["warned"] = repr(tls)
            log.warning("TLS settings changed in the web config; they apply at restart")
        if fresh is not sslobj.context:
            sslobj.context = fresh
        return None

    context.sni_callback = choose
    return context


def _show_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


async def start_server(
    app: web.Application,
    listen_address: str,
    web_config: WebConfig | None,
    *,
    header_timeout: float = HEADER_TIMEOUT_SECONDS,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    max_connections: int = MAX_CONNECTIONS,
) -> web.AppRunner:
    """Serve `app` on `listen_address`, over TLS when `web_config` sets it up.

    A connection must deliver its first request's headers within `header_timeout` seconds
    and is closed after `idle_timeout` seconds without a request; past `max_connections`
    open connections, new ones are answered 503 and closed (see exporter.web.connections).

    `:port` and `[::]:port` listen on IPv6 and IPv4 alike. Raises ListenError (an OSError)
    with a message for the operator when the address is bad, taken or not ours, or the TLS
    certificate cannot be loaded. The caller
    stops the server with `await runner.cleanup()`; `runner.addresses` tells the bound port.
    """
    host, port = parse_listen_address(listen_address)
    ssl_context: ssl.SSLContext | None = None
    guard = app.get(GUARD)
    if guard is not None and guard.source is None and web_config is not None:
        # The file that sets up the listener guards the requests too (auth, SANs, headers).
        guard.source = WebConfigSource(web_config)
    if web_config is not None and web_config.tls_server_config is not None:
        source = guard.source if guard is not None else None
        if source is None or source.path != web_config.path:
            source = WebConfigSource(web_config)
        try:
            ssl_context = _serving_context(source)
        except WebConfigError as exc:
            raise ListenError(None, f"cannot serve TLS on {listen_address}: {exc}") from None
    runner = BoundedAppRunner(
        app,
        header_timeout=header_timeout,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
    )
    await runner.setup()
    try:
        site: web.BaseSite
        if host is None or host == "::":
            sock = _dual_stack_socket(port, v6_only_host=host == "::")
            site = web.SockSite(runner, sock, ssl_context=ssl_context)
        else:
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise _listen_error(listen_address, exc) from None
    log.info(
        "serving HTTP",
        addresses=[_show_address(a) for a in runner.addresses],
        tls=ssl_context is not None,
        basic_auth=bool(web_config and web_config.auth_enabled),
        max_connections=max_connections,
        header_timeout_seconds=header_timeout,
    )
    return runner
