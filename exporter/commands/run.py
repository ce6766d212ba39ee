"""`portscan-exporter [run] --config FILE`: the long-running exporter (the default command)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from exporter.config import Config
    from exporter.daemon.runner import Daemon
    from exporter.web.webconfig import WebConfig

DEFAULT_LISTEN_ADDRESS = ":9678"
SHUTDOWN_GRACE_SECONDS = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config.file",
        "--config",
        dest="config",
        default="config.yaml",
        metavar="FILE",
        help="configuration file (default %(default)s)",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=DEFAULT_LISTEN_ADDRESS,
        help="address to serve /metrics, the status page and the API on (default %(default)s)",
    )
    parser.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        default="/metrics",
        help="path under which to expose metrics (default %(default)s)",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config",
        default=None,
        metavar="FILE",
        help="exporter-toolkit web configuration: TLS and basic auth",
    )
    parser.add_argument(
        "--storage.relearn",
        dest="relearn",
        action="store_true",
        help="start even though the store a daemon used before is gone or empty, learning new"
        " baselines from the next scans (without it the daemon refuses to start)",
    )
    parser.add_argument(
        "--web.enable-lifecycle",
        dest="enable_lifecycle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve POST /-/reload (as blackbox_exporter does; SIGHUP reloads either way);"
        " --no-web.enable-lifecycle refuses it with 403, as Prometheus does by default",
    )
    add_logging_arguments(parser)


LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("auto", "json", "logfmt", "console")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log.level", dest="log_level", choices=LOG_LEVELS, default="info")
    parser.add_argument(
        "--log.format",
        dest="log_format",
        choices=LOG_FORMATS,
        default="auto",
        help="auto: json when stderr is not a terminal, console when it is",
    )


def run(args: argparse.Namespace) -> int:
    from exporter import eventloop
    from exporter.config import ConfigError, load_config
    from exporter.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config, check_paths=True)  # an unusable store fails here
    except ConfigError as exc:
        print(f"portscan-exporter: {exc}", file=sys.stderr)
        return 1
    web_config: WebConfig | None = None
    if args.web_config:
        from exporter.web.webconfig import WebConfigError, load_web_config

        try:
            web_config = load_web_config(args.web_config)
        except WebConfigError as exc:
            print(f"portscan-exporter: {exc}", file=sys.stderr)
            return 1
    return eventloop.run(_serve(args, config, web_config))


async def _serve(args: argparse.Namespace, config: Config, web_config: WebConfig | None) -> int:
    from prometheus_client import CollectorRegistry
    from prometheus_client.gc_collector import GCCollector
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector

    from exporter.daemon.runner import Daemon
    from exporter.web.app import build_app
    from exporter.web.metrics import SnapshotExposition

    daemon = Daemon(config, relearn=args.relearn)
    process = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=process)
    exposition = SnapshotExposition(lambda: daemon.snapshot, process)
    app = build_app(
        daemon,
        exposition,
        telemetry_path=args.telemetry_path,
        web_config=web_config,
        enable_lifecycle=args.enable_lifecycle,
    )
    return await serve(daemon, app, args.listen_address, web_config)


async def serve(
    daemon: Daemon, app: web.Application, listen_address: str, web_config: WebConfig | None
) -> int:
    """Listen first, then start: /-/healthy answers and /-/ready says 503 while the stored
    state loads, as Prometheus does while it replays its WAL. Runs until SIGTERM/SIGINT or
    `daemon.stop()`; SIGHUP reloads the config."""
    import structlog

    from exporter.web.listen import start_server

    log = structlog.get_logger("portscan_exporter")
    try:
        runner = await start_server(app, listen_address, web_config)
    except OSError as exc:
        log.error("cannot start", error=str(exc))
        return 1
    # Signals are ours from the moment we listen: a SIGHUP during start-up must not kill
    # the process (reload answers that it is still starting), a SIGTERM stops it after.
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, daemon.stop)
    loop.add_signal_handler(signal.SIGINT, daemon.stop)
    reloads: set[asyncio.Task[object]] = set()

    def reload_on_sighup() -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(daemon.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_on_sighup)
    try:
        try:
            await daemon.startup()
        except OSError as exc:
            log.error("cannot start", error=str(exc))
            return 1
        await daemon.main_loop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await daemon.shutdown(SHUTDOWN_GRACE_SECONDS)
        await runner.cleanup()
    return 0
