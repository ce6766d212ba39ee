"""The daemon's HTTP surface: landing page, /metrics, health, reload and the JSON API.

Endpoints follow what Prometheus exporters serve (exporter-toolkit, Prometheus' own lifecycle
API), so that probes, scrape configs and scripts written for them work here:

  GET  /                        status page (HTML)
  GET  {telemetry path}         the exposition (text format, or OpenMetrics when asked)
  GET  /-/healthy, /-/ready     200, or 503 while the stored state is not loaded
  POST /-/reload (or PUT)       re-read the config; 500 "failed to reload config: ..."
  GET  /api/v1/hosts[/{host}]   hosts as JSON (see `jsonview`)
  GET  /api/v1/history?host=H&since=7d&until=...
  POST /api/v1/baseline/accept  {"host": H, "port": P}; only with basic auth configured

Every request goes through one middleware: the web config (re-read when its file changes),
the rate limit, basic auth, the configured headers, and errors turned into short answers that
never carry a traceback. Work proportional to the number of hosts (rendering, JSON, the
exposition) runs in a thread on an immutable snapshot, so a large fleet never stalls the loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import errno
import gzip
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import prometheus_client
import structlog
from aiohttp import hdrs, web
from prometheus_client.exposition import choose_encoder

from exporter import __version__
from exporter.daemon.jsonview import history_to_json, host_to_json
from exporter.daemon.snapshot import Control
from exporter.daemon.status_page import render_status_page
from exporter.daemon.webconfig import (
    BasicAuthenticator,
    RateLimit,
    TLSServerConfig,
    WebConfig,
    WebConfigError,
    WebConfigSource,
)
from exporter.durations import DurationError, parse_point_in_time
from exporter.state import AcceptRefused

__all__ = [
    "PRODUCT",
    "ListenError",
    "build_app",
    "parse_listen_address",
    "start_server",
]

PRODUCT = "portscan-exporter"
# What /metrics serves: the request's Accept header -> (body, content type).
Exposition = Callable[[str], tuple[bytes, str]]
DEFAULT_HISTORY_SINCE = "7d"
SHUTDOWN_TIMEOUT_SECONDS = 5.0
MAX_REQUEST_BODY_BYTES = 64 * 1024
# The page has no script and no external asset; a configured header replaces this one.
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

log = structlog.get_logger("portscan_exporter")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ListenError(OSError):
    """The server cannot listen where it was told to; `str()` is meant for the operator."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


class _TokenBucket:
    """exporter-toolkit's `rate_limit`: one request per `interval` on average, `burst` at once."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._last = clock()

    def allow(self) -> bool:
        now = self._clock()
        refill = (now - self._last) / self.limit.interval
        self._tokens = min(float(self.limit.burst), self._tokens + refill)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def _error(request: web.Request, status: int, message: str, kind: str) -> web.Response:
    """An error answer: Prometheus API-style JSON under /api/, one line of text elsewhere."""
    if request.path.startswith("/api/"):
        return web.json_response(
            {"status": "error", "errorType": kind, "error": message}, status=status
        )
    return web.Response(status=status, text=f"{message}\n")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data).encode(), content_type="application/json"
    )


async def _json_in_thread(build: Callable[[], Any]) -> web.Response:
    body = await asyncio.to_thread(lambda: json.dumps(build()).encode())
    return web.Response(body=body, content_type="application/json")


def _accepts_gzip(header: str) -> bool:
    for item in header.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        return quality > 0
    return False


def _basic_credentials(header: str) -> tuple[str, str] | None:
    """(user, password) of a `Basic` Authorization header. Bytes that are not UTF-8 survive
    as surrogates, so the password reaches bcrypt exactly as the client sent it."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.decode("utf-8", "surrogateescape").partition(":")
    return (user, password) if colon else None


def _san_value(kind: str, value: str) -> str:
    if kind == "IP Address":
        # Python shows IPv6 SANs expanded and upper-cased; Go's form is the compressed one.
        with contextlib.suppress(ValueError):
            return ipaddress.ip_address(value.strip()).compressed
    return value


def _client_san_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """exporter-toolkit's `client_allowed_sans`: a SAN of the verified client certificate
    (DNS, IP, e-mail or URI) must be in the list. Checked per request: Python's ssl module
    has no hook between verification and the end of the handshake."""
    transport = request.transport
    peer = None if transport is None else transport.get_extra_info("peercert")
    if not peer:
        return False
    wanted = {_san_value("IP Address", a) for a in allowed} | set(allowed)
    names = peer.get("subjectAltName", ())
    return any(_san_value(kind, value) in wanted for kind, value in names)


class _Server:
    def __init__(
        self,
        control: Control,
        exposition: Exposition,
        telemetry_path: str,
        web_config: WebConfig | None,
        clock: Callable[[], float],
    ) -> None:
        self.control = control
        self.exposition = exposition
        self.telemetry_path = telemetry_path
        self.clock = clock
        self.source = None if web_config is None else WebConfigSource(web_config)
        self.authenticator = BasicAuthenticator()
        self._bucket: _TokenBucket | None = None
        self._logged_error: str | None = None
        self._changes_logged = 0

    # -- the middleware -------------------------------------------------------------------

    def web_config(self) -> WebConfig | None:
        if self.source is None:
            return None
        try:
            config = self.source.current()
        except WebConfigError as exc:
            if str(exc) != self._logged_error:
                self._logged_error = str(exc)
                log.error("web config invalid, refusing requests until it is fixed", error=str(exc))
            raise
        self._logged_error = None
        if self.source.changes != self._changes_logged:
            self._changes_logged = self.source.changes
            log.info("web config file changed, now in use", path=str(config.path))
        return config

    def bucket(self, limit: RateLimit) -> _TokenBucket:
        if self._bucket is None or self._bucket.limit != limit:
            self._bucket = _TokenBucket(limit)
        return self._bucket

    async def authorized(self, request: web.Request, config: WebConfig) -> bool:
        credentials = _basic_credentials(request.headers.get(hdrs.AUTHORIZATION, ""))
        if credentials is None:
            return False
        return await self.authenticator.verify(config.basic_auth_users, *credentials)

    async def guarded(
        self, request: web.Request, handler: Handler, config: WebConfig | None
    ) -> web.StreamResponse:
        if config is not None:
            if config.rate_limit is not None and not self.bucket(config.rate_limit).allow():
                return _error(request, 429, "too many requests", "rate_limited")
            tls = config.tls_server_config
            sans = None if tls is None else tls.client_allowed_sans
            if sans is not None and not _client_san_allowed(request, sans):
                return _error(request, 403, "client certificate not allowed (SAN)", "forbidden")
            needs_auth = config.auth_enabled and request.path not in config.auth_excluded_paths
            if needs_auth and not await self.authorized(request, config):
                response = _error(request, 401, "unauthorized", "unauthorized")
                response.headers[hdrs.WWW_AUTHENTICATE] = "Basic"
                return response
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return self.http_error(request, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request failed", method=request.method, path=request.path)
            return _error(request, 500, "internal server error", "internal")

    def http_error(self, request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
        if exc.status == 404:
            response = _error(request, 404, "404 page not found", "not_found")
        elif exc.status == 405:
            allowed = exc.headers.get(hdrs.ALLOW, "")
            response = _error(
                request, 405, f"method not allowed (use {allowed or 'another method'})", "bad_data"
            )
            if allowed:
                response.headers[hdrs.ALLOW] = allowed
        elif exc.status < 400:
            return exc  # a redirect: let aiohttp send it as it is
        else:
            response = _error(request, exc.status, f"{exc.status} {exc.reason}", "bad_data")
        return response

    # -- endpoints ------------------------------------------------------------------------

    async def landing(self, request: web.Request) -> web.StreamResponse:
        snapshot = self.control.snapshot
        now = self.clock()
        page = await asyncio.to_thread(
            render_status_page,
            snapshot,
            now=now,
            telemetry_path=self.telemetry_path,
            version=__version__,
            product=PRODUCT,
        )
        return web.Response(
            text=page,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"},
        )

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        accept = request.headers.get(hdrs.ACCEPT, "")
        compress = _accepts_gzip(request.headers.get(hdrs.ACCEPT_ENCODING, ""))
        exposition = self.exposition

        def render() -> tuple[bytes, str]:
            output, content_type = exposition(accept)
            if compress:
                output = gzip.compress(output, compresslevel=6)
            return output, content_type

        body, content_type = await asyncio.to_thread(render)
        headers = {hdrs.CONTENT_TYPE: content_type, hdrs.VARY: "Accept, Accept-Encoding"}
        if compress:
            headers[hdrs.CONTENT_ENCODING] = "gzip"
        return web.Response(body=body, headers=headers)

    async def healthy(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Healthy\n")

    async def ready(self, request: web.Request) -> web.StreamResponse:
        if self.control.snapshot.ready:
            return web.Response(text="Ready\n")
        return web.Response(status=503, text="Not ready: loading the stored state\n")

    async def reload(self, request: web.Request) -> web.StreamResponse:
        try:
            result = await self.control.reload()
        except Exception as exc:
            log.exception("reload failed")
            return web.Response(status=500, text=f"failed to reload config: {exc}\n")
        if not result.successful:
            return web.Response(
                status=500, text=f"failed to reload config: {result.error or 'unknown error'}\n"
            )
        return web.Response(text="")

    async def hosts(self, request: web.Request) -> web.StreamResponse:
        snapshot = self.control.snapshot
        now = self.clock()
        return await _json_in_thread(
            lambda: {"hosts": [host_to_json(view, now) for view in snapshot.hosts]}
        )

    async def host(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["host"]
        view = self.control.snapshot.host(name)
        if view is None:
            return _error(request, 404, f"unknown host {name!r}", "not_found")
        return _json(host_to_json(view, self.clock()))

    async def history(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        host = query.get("host", "")
        if not host:
            return _error(request, 400, "missing parameter 'host'", "bad_data")
        now = self.clock()
        try:
            since = parse_point_in_time(query.get("since") or DEFAULT_HISTORY_SINCE, now)
        except DurationError as exc:
            return _error(request, 400, f"invalid parameter 'since': {exc}", "bad_data")
        until: float | None = None
        if query.get("until"):
            try:
                until = parse_point_in_time(query["until"], now)
            except DurationError as exc:
                return _error(request, 400, f"invalid parameter 'until': {exc}", "bad_data")
            if until < since:
                return _error(
                    request, 400, "invalid parameters: 'until' is before 'since'", "bad_data"
                )
        history = await self.control.history(host, since, until)
        known = self.control.snapshot.host(host) is not None
        if not known and not (history.events or history.intervals or history.scans):
            return _error(
                request, 404, f"unknown host {host!r}: not configured, no history", "not_found"
            )

        def build() -> dict[str, Any]:
            data = history_to_json(host, history)
            data["since"] = since
            data["until"] = until
            return data

        return await _json_in_thread(build)

    async def accept(self, request: web.Request) -> web.StreamResponse:
        config = self.web_config()
        if config is None or not config.auth_enabled:
            return _error(
                request,
                403,
                "accepting a baseline over HTTP is disabled: configure basic_auth_users in"
                " the file given with --web.config.file to enable it",
                "forbidden",
            )
        # JSON only: a cross-site form cannot send it without a CORS preflight, which this
        # server never grants, so a browser holding the credentials cannot be made to accept.
        if request.content_type != "application/json":
            return _error(request, 415, "the body must be JSON (application/json)", "bad_data")
        try:
            body = await request.json()
        except ValueError:
            return _error(request, 400, "the body is not valid JSON", "bad_data")
        if not isinstance(body, dict):
            return _error(request, 400, 'expected {"host": "...", "port": 22}', "bad_data")
        unknown = sorted(set(body) - {"host", "port"})
        if unknown:
            return _error(request, 400, f"unknown field(s): {', '.join(unknown)}", "bad_data")
        host, port = body.get("host"), body.get("port")
        if not isinstance(host, str) or not host:
            return _error(request, 400, "'host' must be a non-empty string", "bad_data")
        if port is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535
        ):
            return _error(request, 400, "'port' must be a port number (1-65535)", "bad_data")
        view = self.control.snapshot.host(host)
        if view is None:
            return _error(request, 404, f"unknown host {host!r}", "not_found")
        try:
            state = await self.control.accept(host, port)
        except AcceptRefused as exc:
            return _error(request, 409, str(exc), "conflict")
        log.info("baseline accepted over HTTP", host=host, port=port, remote=request.remote)
        current = self.control.snapshot.host(host) or view
        return _json(host_to_json(dataclasses.replace(current, state=state), self.clock()))


_SERVER = web.AppKey("portscan_server", _Server)


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    server = request.app[_SERVER]
    try:
        config = server.web_config()
    except WebConfigError:
        return web.Response(
            status=500,
            text="500 internal server error: the web config file is invalid (see the log)\n",
        )
    response = await server.guarded(request, handler, config)
    if config is not None:
        for name, value in config.headers.items():
            response.headers[name] = value
    return response


def registry_exposition(registry: prometheus_client.CollectorRegistry) -> Exposition:
    """An Exposition of a prometheus_client registry, negotiating the format from Accept."""

    def render(accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        output: bytes = encoder(registry)
        return output, content_type

    return render


def build_app(
    control: Control,
    exposition: Exposition,
    *,
    telemetry_path: str = "/metrics",
    web_config: WebConfig | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The aiohttp application; `start_server` serves it. `clock` is wall-clock seconds."""
    if not telemetry_path.startswith("/"):
        raise ValueError(f"the telemetry path must start with '/', not {telemetry_path!r}")
    server = _Server(control, exposition, telemetry_path, web_config, clock)
    app = web.Application(middlewares=[_middleware], client_max_size=MAX_REQUEST_BODY_BYTES)
    app[_SERVER] = server
    router = app.router
    router.add_get(telemetry_path, server.metrics)
    if telemetry_path != "/":
        router.add_get("/", server.landing)
    router.add_get("/-/healthy", server.healthy)
    router.add_get("/-/ready", server.ready)
    router.add_post("/-/reload", server.reload)
    router.add_put("/-/reload", server.reload)
    router.add_get("/api/v1/hosts", server.hosts)
    router.add_get("/api/v1/hosts/{host}", server.host)
    router.add_get("/api/v1/history", server.history)
    router.add_post("/api/v1/baseline/accept", server.accept)
    return app


# --- listening ---------------------------------------------------------------------------------


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
    app: web.Application, listen_address: str, web_config: WebConfig | None
) -> web.AppRunner:
    """Serve `app` on `listen_address`, over TLS when `web_config` sets it up.

    `:port` and `[::]:port` listen on IPv6 and IPv4 alike. Raises ListenError (an OSError)
    with a message for the operator when the address is bad, taken or not ours, or the TLS
    certificate cannot be loaded. The caller
    stops the server with `await runner.cleanup()`; `runner.addresses` tells the bound port.
    """
    host, port = parse_listen_address(listen_address)
    ssl_context: ssl.SSLContext | None = None
    server = app.get(_SERVER)
    if server is not None and server.source is None and web_config is not None:
        # The file that sets up the listener guards the requests too (auth, SANs, headers).
        server.source = WebConfigSource(web_config)
    if web_config is not None and web_config.tls_server_config is not None:
        source = server.source if server is not None else None
        if source is None or source.path != web_config.path:
            source = WebConfigSource(web_config)
        try:
            ssl_context = _serving_context(source)
        except WebConfigError as exc:
            raise ListenError(None, f"cannot serve TLS on {listen_address}: {exc}") from None
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS
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
    )
    return runner
