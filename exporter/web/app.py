"""The daemon's HTTP surface: landing page, /metrics, health, reload and the JSON API.

Endpoints follow what Prometheus exporters serve (exporter-toolkit, Prometheus' own lifecycle
API), so that probes, scrape configs and scripts written for them work here:

  GET  /                        status page (HTML)
  GET  {telemetry path}         the exposition (text format 0.0.4; gzip or deflate if asked)
  GET  /-/healthy, /-/ready     200, or 503 while the stored state is not loaded
  POST /-/reload (or PUT)       re-read the config; 500 "failed to reload config: ..."
  GET  /api/v1/hosts[/{host}]   hosts as JSON (see `jsonview`)
  GET  /api/v1/history?host=H&since=7d&until=...
  POST /api/v1/baseline/accept  {"host": H, "port": P}; only with basic auth configured

Every request first passes the guard (`guard.py`: web config, rate limit, TLS SANs, basic
auth, headers, errors); `listen.py` serves the application. Work proportional to the
number of hosts (rendering, JSON, the exposition) runs in a thread on an immutable snapshot,
so a large fleet never stalls the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import hdrs, web

from exporter import __version__
from exporter.daemon.snapshot import Control
from exporter.durations import DurationError, parse_point_in_time
from exporter.state import AcceptRefused
from exporter.web.guard import GUARD, Guard, error_response, guard_middleware
from exporter.web.jsonview import HostsDocument, history_to_json, host_to_json
from exporter.web.metrics import CONTENT_TYPE, SnapshotExposition, negotiate
from exporter.web.status_page import render_status_page
from exporter.web.webconfig import WebConfig

__all__ = ["PRODUCT", "build_app"]

PRODUCT = "portscan-exporter"
DEFAULT_HISTORY_SINCE = "7d"
MAX_REQUEST_BODY_BYTES = 64 * 1024
# The page has no script and no external asset; a configured header replaces this one.
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

log = structlog.get_logger("portscan_exporter")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data).encode(), content_type="application/json"
    )


async def _json_in_thread(build: Callable[[], Any]) -> web.Response:
    body = await asyncio.to_thread(lambda: json.dumps(build()).encode())
    return web.Response(body=body, content_type="application/json")


class _Endpoints:
    def __init__(
        self,
        control: Control,
        exposition: SnapshotExposition,
        telemetry_path: str,
        guard: Guard,
        clock: Callable[[], float],
    ) -> None:
        self.control = control
        self.exposition = exposition
        self.telemetry_path = telemetry_path
        self.guard = guard
        self.clock = clock
        self.hosts_document = HostsDocument()

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
        if not self.control.snapshot.ready:
            # No series rather than series that look like hosts never scanned: Prometheus
            # records up == 0, as during an outage, and the rules hold the last state.
            return web.Response(status=503, text="Not ready: loading the stored state\n")
        # Rendered and compressed once per snapshot, and concurrent scrapes share one batch:
        # a crowd of scrapers costs one thread at a time and never starves scans. (aiohttp's
        # enable_compression() would gzip the multi-MB body again for every scrape: measured,
        # 50 scrapers then cut the scan rate to 0.31x; see bench/daemon_load.py.)
        coding = negotiate(request.headers.get(hdrs.ACCEPT_ENCODING, ""))
        headers = {hdrs.CONTENT_TYPE: CONTENT_TYPE, hdrs.VARY: hdrs.ACCEPT_ENCODING}
        if coding is not None:
            headers[hdrs.CONTENT_ENCODING] = coding
        return web.Response(body=await self.exposition.scrape(coding), headers=headers)

    async def healthy(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Healthy\n")

    async def ready(self, request: web.Request) -> web.StreamResponse:
        snapshot = self.control.snapshot
        if snapshot.ready and not snapshot.store.last_write_ok:
            error = snapshot.store.last_error or "unknown error"
            return web.Response(status=503, text=f"Not ready: the store refuses writes ({error})\n")
        if snapshot.ready:
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
        body = await asyncio.to_thread(self.hosts_document.render, snapshot.hosts, now)
        return web.Response(body=body, content_type="application/json")

    async def host(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["host"]
        view = self.control.snapshot.host(name)
        if view is None:
            return error_response(request, 404, f"unknown host {name!r}", "not_found")
        return _json(host_to_json(view, self.clock()))

    async def history(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        host = query.get("host", "")
        if not host:
            return error_response(request, 400, "missing parameter 'host'", "bad_data")
        now = self.clock()
        try:
            since = parse_point_in_time(query.get("since") or DEFAULT_HISTORY_SINCE, now)
        except DurationError as exc:
            return error_response(request, 400, f"invalid parameter 'since': {exc}", "bad_data")
        until: float | None = None
        if query.get("until"):
            try:
                until = parse_point_in_time(query["until"], now)
            except DurationError as exc:
                return error_response(request, 400, f"invalid parameter 'until': {exc}", "bad_data")
            if until < since:
                return error_response(
                    request, 400, "invalid parameters: 'until' is before 'since'", "bad_data"
                )
        history = await self.control.history(host, since, until)
        known = self.control.snapshot.host(host) is not None
        if not known and not (history.events or history.intervals or history.scans):
            return error_response(
                request, 404, f"unknown host {host!r}: not configured, no history", "not_found"
            )

        def build() -> dict[str, Any]:
            data = history_to_json(host, history)
            data["since"] = since
            data["until"] = until
            return data

        return await _json_in_thread(build)

    async def accept(self, request: web.Request) -> web.StreamResponse:
        config = self.guard.web_config()
        if config is None or not config.auth_enabled:
            return error_response(
                request,
                403,
                "accepting a baseline over HTTP is disabled: configure basic_auth_users in"
                " the file given with --web.config.file to enable it",
                "forbidden",
            )
        # JSON only: a cross-site form cannot send it without a CORS preflight, which this
        # server never grants, so a browser holding the credentials cannot be made to accept.
        if request.content_type != "application/json":
            return error_response(
                request, 415, "the body must be JSON (application/json)", "bad_data"
            )
        try:
            body = await request.json()
        except ValueError:
            return error_response(request, 400, "the body is not valid JSON", "bad_data")
        if not isinstance(body, dict):
            return error_response(request, 400, 'expected {"host": "...", "port": 22}', "bad_data")
        unknown = sorted(set(body) - {"host", "port"})
        if unknown:
            return error_response(
                request, 400, f"unknown field(s): {', '.join(unknown)}", "bad_data"
            )
        host, port = body.get("host"), body.get("port")
        if not isinstance(host, str) or not host:
            return error_response(request, 400, "'host' must be a non-empty string", "bad_data")
        if port is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535
        ):
            return error_response(
                request, 400, "'port' must be a port number (1-65535)", "bad_data"
            )
        view = self.control.snapshot.host(host)
        if view is None:
            return error_response(request, 404, f"unknown host {host!r}", "not_found")
        try:
            state = await self.control.accept(host, port)
        except AcceptRefused as exc:
            return error_response(request, 409, str(exc), "conflict")
        log.info("baseline accepted over HTTP", host=host, port=port, remote=request.remote)
        current = self.control.snapshot.host(host) or view
        return _json(host_to_json(dataclasses.replace(current, state=state), self.clock()))


async def _lifecycle_disabled(request: web.Request) -> web.StreamResponse:
    return web.Response(status=403, text="Lifecycle API is not enabled.\n")


def build_app(
    control: Control,
    exposition: SnapshotExposition,
    *,
    telemetry_path: str = "/metrics",
    web_config: WebConfig | None = None,
    clock: Callable[[], float] = time.time,
    enable_lifecycle: bool = True,
) -> web.Application:
    """The aiohttp application; `start_server` serves it. `clock` is wall-clock seconds.

    `enable_lifecycle` False: POST /-/reload is refused (403), as Prometheus does without
    --web.enable-lifecycle; SIGHUP still reloads. Where it is enabled and the port is
    reachable by others, basic auth from the web config guards it like every endpoint.
    """
    if not telemetry_path.startswith("/"):
        raise ValueError(f"the telemetry path must start with '/', not {telemetry_path!r}")
    guard = Guard(web_config)
    server = _Endpoints(control, exposition, telemetry_path, guard, clock)
    app = web.Application(middlewares=[guard_middleware], client_max_size=MAX_REQUEST_BODY_BYTES)
    app[GUARD] = guard
    router = app.router
    router.add_get(telemetry_path, server.metrics)
    if telemetry_path != "/":
        router.add_get("/", server.landing)
    router.add_get("/-/healthy", server.healthy)
    router.add_get("/-/ready", server.ready)
    reload = server.reload if enable_lifecycle else _lifecycle_disabled
    router.add_post("/-/reload", reload)
    router.add_put("/-/reload", reload)
    router.add_get("/api/v1/hosts", server.hosts)
    router.add_get("/api/v1/hosts/{host}", server.host)
    router.add_get("/api/v1/history", server.history)
    router.add_post("/api/v1/baseline/accept", server.accept)
    return app
