"""`portscan-exporter history --host H`: when each port opened and closed, and what ran on it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the store is imported when a command runs, not when the CLI starts
    from exporter.store import History, Store


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the command it wins, otherwise the top-level value stays.
    parser.add_argument(
        "--config.file",
        "--config",
        dest="config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="configuration file whose storage.path holds the history (default config.yaml)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", required=True, help="host as named in the config")
    parser.add_argument(
        "--since", default="7d", help="a duration ago, RFC 3339 or unix seconds (default 7d)"
    )
    parser.add_argument("--until", default=None, help="same forms as --since (default now)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_config_argument(parser)


def open_store(config_path: str) -> Store:
    from exporter.config import load_config
    from exporter.store import Store

    config = load_config(config_path)
    if not config.storage.path.exists():
        raise FileNotFoundError(f"no state at {config.storage.path} (has the exporter run?)")
    return Store.open(config.storage.path)


def run(args: argparse.Namespace) -> int:
    from exporter.config import ConfigError
    from exporter.durations import DurationError, parse_point_in_time
    from exporter.web.jsonview import history_to_json

    now = time.time()
    try:
        since = parse_point_in_time(args.since, now)
        until = None if args.until is None else parse_point_in_time(args.until, now)
        store = open_store(args.config)
    except (ConfigError, DurationError, FileNotFoundError) as exc:
        print(f"portscan-exporter history: {exc}", file=sys.stderr)
        return 1
    with store:
        if args.host not in store.hosts():
            print(f"portscan-exporter history: no history for host {args.host}", file=sys.stderr)
            return 1
        history = store.history(args.host, since, until)
    if args.format == "json":
        print(json.dumps(history_to_json(args.host, history), indent=2))
    else:
        print(history_table(args.host, history, since))
    return 0


def _when(ts: float | None) -> str:
    if ts is None:
        return "now"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def history_table(host: str, history: History, since: float) -> str:
    from exporter.model import describe_fingerprint

    lines = [f"{host}: history since {_when(since)} UTC", "", "PORT TIMELINE"]
    if history.intervals:
        lines.append(f"{'PORT':<10}{'FROM':<21}{'TO':<21}SERVICE")
        for iv in history.intervals:
            service = " ".join(part for part in (iv.service, iv.product, iv.version) if part)
            lines.append(f"{f'{iv.port}/tcp':<10}{_when(iv.start):<21}{_when(iv.end):<21}{service}")
    else:
        lines.append("(no open port in this period)")
    lines += ["", "EVENTS"]
    if history.events:
        lines.append(f"{'TIME':<21}{'PORT':<10}{'EVENT':<32}{'SEVERITY':<10}CHANGE")
        for stored in history.events:
            ev = stored.event
            port = "-" if ev.port is None else f"{ev.port}/tcp"
            kind = ev.kind.value + (" (resolved)" if ev.resolved else "")
            old, new = describe_fingerprint(ev.old_service), describe_fingerprint(ev.new_service)
            change = f"{old} -> {new}"
            lines.append(f"{_when(ev.at):<21}{port:<10}{kind:<32}{ev.severity.word:<10}{change}")
    else:
        lines.append("(no events in this period)")
    scans = history.scans
    if scans:
        failed = sum(1 for s in scans if s.result != "success")
        lines += ["", f"{len(scans)} scans in this period, {failed} failed or unanswered"]
    return "\n".join(lines)
