"""`portscan-exporter scan HOST`: one scan, printed as a table or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from exporter import eventloop
from exporter.durations import DurationError, parse_duration
from exporter.model import ScanResult
from exporter.portsets import PortSetError, resolve_ports
from exporter.scanner import ScanOptions, raise_fd_limit, scan_host

_DEFAULTS = ScanOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host", help="DNS name, IPv4 or IPv6 address")
    parser.add_argument(
        "--ports",
        default="top1000",
        help="port set: top100, top1000, all, N, N-M or a comma list of them (default top1000)",
    )
    parser.add_argument("--exclude", default=None, help="port set to leave out")
    parser.add_argument(
        "--timeout",
        default=f"{_DEFAULTS.timeout:g}s",
        help="ceiling for one connect attempt, e.g. 500ms, 2s (default %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=_DEFAULTS.retries,
        help="extra attempts for an unanswered port (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=_DEFAULTS.concurrency,
        help="probes in flight (default %(default)s)",
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="probes per second, 0 = unlimited (default 0)"
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--all-states", action="store_true", help="also list closed and filtered ports"
    )


def run(args: argparse.Namespace) -> int:
    try:
        ports = resolve_ports(args.ports, args.exclude)
        options = ScanOptions(
            timeout=parse_duration(args.timeout),
            retries=args.retries,
            concurrency=args.concurrency,
            rate=args.rate,
        )
    except (PortSetError, DurationError, ValueError) as exc:
        print(f"portscan-exporter scan: {exc}", file=sys.stderr)
        return 2
    allowed = raise_fd_limit(options.concurrency)
    if allowed < options.concurrency:
        print(
            f"portscan-exporter scan: open-file limit allows {allowed} probes in flight, "
            f"lowering --concurrency from {options.concurrency}",
            file=sys.stderr,
        )
        options = ScanOptions(
            timeout=options.timeout,
            retries=options.retries,
            concurrency=allowed,
            rate=options.rate,
        )
    result = eventloop.run(scan_host(args.host, ports, options))
    if result.error is not None:
        print(f"portscan-exporter scan: {result.error}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(result_to_json(result, all_states=args.all_states)))
    else:
        print(result_to_table(result, all_states=args.all_states))
    return 0


def _port_rows(result: ScanResult, all_states: bool) -> list[tuple[int, str]]:
    rows = [(port, "open") for port in result.open]
    if all_states:
        rows += [(port, "closed") for port in result.closed]
        rows += [(port, "filtered") for port in result.filtered]
    return sorted(rows)


def result_to_json(result: ScanResult, *, all_states: bool = False) -> dict[str, Any]:
    return {
        "host": result.host,
        "address": result.address,
        "duration_seconds": round(result.duration_seconds, 6),
        "ports_scanned": result.ports_scanned,
        "answered": result.answered,
        "ports": [
            {"port": port, "protocol": "tcp", "state": state}
            for port, state in _port_rows(result, all_states)
        ],
    }


def result_to_table(result: ScanResult, *, all_states: bool = False) -> str:
    lines = [
        f"{result.host} ({result.address}): {result.ports_scanned} ports scanned in "
        f"{result.duration_seconds:.2f}s"
        + ("" if result.answered else ", no answer from the host (unreachable or all filtered)")
    ]
    rows = _port_rows(result, all_states)
    if rows:
        lines.append(f"{'PORT':<10}STATE")
        lines += [f"{f'{port}/tcp':<10}{state}" for port, state in rows]
    else:
        lines.append("no open ports")
    if not all_states:
        lines.append(f"closed: {len(result.closed)}, filtered: {len(result.filtered)}")
    return "\n".join(lines)
