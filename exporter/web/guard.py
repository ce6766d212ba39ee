"""What every request passes before its handler: the web config, rate limit, client
certificate SANs, basic auth, the configured headers, and errors turned into short answers.

The web config file is re-read when it changes (`WebConfigSource`); while it is invalid,
every request is refused with 500 rather than served with protection the operator removed
by mistake. Errors never carry a traceback: Prometheus API-style JSON under /api/, one line
of text elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import hdrs, web

from exporter.web.basic_auth import BasicAuthenticator
from exporter.web.config_source import WebConfigSource
from exporter.web.webconfig import RateLimit, WebConfig, WebConfigError

log = structlog.get_logger("portscan_exporter")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(request: web.Request, status: int, message: str, kind: str) -> web.Response:
    """An error answer: Prometheus API-style JSON under /api/, one line of text elsewhere."""
    if request.path.startswith("/api/"):
        return web.json_response(
            {"status": "error", "errorType": kind, "error": message}, status=status
        )
    return web.Response(status=status, text=f"{message}\n")


class TokenBucket:
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


def basic_credentials(header: str) -> tuple[str, str] | None:
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


def client_san_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
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


class Guard:
    """The web config in force and the checks it asks for; one per application."""

    def __init__(self, web_config: WebConfig | None) -> None:
        self.source = None if web_config is None else WebConfigSource(web_config)
        self.authenticator = BasicAuthenticator()
        self._bucket: TokenBucket | None = None
        self._logged_error: str | None = None
        self._changes_logged = 0

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

    def bucket(self, limit: RateLimit) -> TokenBucket:
        if self._bucket is None or self._bucket.limit != limit:
            self._bucket = TokenBucket(limit)
        return self._bucket

    async def authorized(self, request: web.Request, config: WebConfig) -> bool:
        credentials = basic_credentials(request.headers.get(hdrs.AUTHORIZATION, ""))
        if credentials is None:
            return False
        return await self.authenticator.verify(config.basic_auth_users, *credentials)

    async def guarded(
        self, request: web.Request, handler: Handler, config: WebConfig | None
    ) -> web.StreamResponse:
        if config is not None:
            if config.rate_limit is not None and not self.bucket(config.rate_limit).allow():
                return error_response(request, 429, "too many requests", "rate_limited")
            tls = config.tls_server_config
            sans = None if tls is None else tls.client_allowed_sans
            if sans is not None and not client_san_allowed(request, sans):
                return error_response(
                    request, 403, "client certificate not allowed (SAN)", "forbidden"
                )
            needs_auth = config.auth_enabled and request.path not in config.auth_excluded_paths
            if needs_auth and not await self.authorized(request, config):
                response = error_response(request, 401, "unauthorized", "unauthorized")
                response.headers[hdrs.WWW_AUTHENTICATE] = "Basic"
                return response
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return http_error(request, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request failed", method=request.method, path=request.path)
            return error_response(request, 500, "internal server error", "internal")


def http_error(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    if exc.status == 404:
        response = error_response(request, 404, "404 page not found", "not_found")
    elif exc.status == 405:
        allowed = exc.headers.get(hdrs.ALLOW, "")
        response = error_response(
            request, 405, f"method not allowed (use {allowed or 'another method'})", "bad_data"
        )
        if allowed:
            response.headers[hdrs.ALLOW] = allowed
    elif exc.status < 400:
        return exc  # a redirect: let aiohttp send it as it is
    else:
        response = error_response(request, exc.status, f"{exc.status} {exc.reason}", "bad_data")
    return response


GUARD = web.AppKey("portscan_guard", Guard)


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = request.app[GUARD]
    try:
        config = guard.web_config()
    except WebConfigError:
        return web.Response(
            status=500,
            text="500 internal server error: the web config file is invalid (see the log)\n",
        )
    response = await guard.guarded(request, handler, config)
    if config is not None:
        for name, value in config.headers.items():
            response.headers[name] = value
    return response
