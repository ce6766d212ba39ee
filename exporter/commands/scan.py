"""`portscan-exporter scan HOST`: one scan, printed as a table or one JSON object.

Open ports are then identified the way the daemon identifies them (same engine, same
limits), unless `--no-identify` asks for the bare scan.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter import eventloop
from exporter.durations import DurationError, parse_duration
from exporter.model import UNKNOWN_SERVICE, ScanResult, ServiceIdentity
from exporter.portsets import PortSetError, resolve_ports
from exporter.scanner import ScanOptions, raise_fd_limit, scan_host

if TYPE_CHECKING:  # the engine (and its TLS stack) is imported only when identifying
    from exporter.fingerprint import Fingerprinter

_DEFAULTS = ScanOptions()
IDENTIFY_TIMEOUT = "5s"  # the engine's and the config's default fingerprint.timeout

Services = Mapping[int, ServiceIdentity]


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
    parser.add_argument(
        "--no-identify",
        dest="identify",
        action="store_false",
        help="only scan: do not identify the service on the open ports",
    )
    parser.add_argument(
        "--identify-timeout",
        default=IDENTIFY_TIMEOUT,
        help="time to identify one port, all probes together, like fingerprint.timeout "
        "in the config (default %(default)s)",
    )
    parser.add_argument(
        "--nmap-service-probes",
        type=Path,
        default=None,
        metavar="PATH",
        help="also use nmap's probe database, e.g. /usr/share/nmap/nmap-service-probes",
    )


def _fail(message: object, code: int) -> int:
    print(f"portscan-exporter scan: {message}", file=sys.stderr)
    return code


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
        return _fail(exc, 2)
    fingerprinter: Fingerprinter | None = None
    if args.identify:
        from exporter.fingerprint import Fingerprinter, FingerprintOptions

        try:
            fp_options = FingerprintOptions(
                timeout=parse_duration(args.identify_timeout),
                nmap_service_probes=args.nmap_service_probes,
            )
        except (DurationError, ValueError) as exc:
            return _fail(f"--identify-timeout: {exc}", 2)
        # Before the scan: a bad --nmap-service-probes should not cost a whole scan first.
        try:
            fingerprinter = Fingerprinter.load(fp_options)
        except (OSError, ValueError) as exc:
            return _fail(f"--nmap-service-probes: {exc}", 2)
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
    result, services = eventloop.run(_scan(args.host, ports, options, fingerprinter))
    if result.error is not None:
        return _fail(result.error, 1)
    if args.format == "json":
        print(json.dumps(result_to_json(result, all_states=args.all_states, services=services)))
    else:
        print(result_to_table(result, all_states=args.all_states, services=services))
    return 0


async def _scan(
    host: str,
    ports: Sequence[int],
    options: ScanOptions,
    fingerprinter: Fingerprinter | None,
) -> tuple[ScanResult, Services | None]:
    """The scan, then (with a `fingerprinter`) the services on its open ports; None: not asked."""
    result = await scan_host(host, ports, options)
    if fingerprinter is None:
        return result, None
    return result, await fingerprinter.identify_scanned(result)


def _port_rows(result: ScanResult, all_states: bool) -> list[tuple[int, str]]:
    rows = [(port, "open") for port in result.open]
    if all_states:
        rows += [(port, "closed") for port in result.closed]
        rows += [(port, "filtered") for port in result.filtered]
    return sorted(rows)


def _port_to_json(port: int, state: str, services: Services | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"port": port, "protocol": "tcp", "state": state}
    if services is not None and state == "open":
        entry |= services.get(port, UNKNOWN_SERVICE).to_json()
    return entry


def result_to_json(
    result: ScanResult, *, all_states: bool = False, services: Services | None = None
) -> dict[str, Any]:
    """The scan as one JSON object; open ports carry their identity when `services` is given."""
    return {
        "host": result.host,
        "address": result.address,
        "duration_seconds": round(result.duration_seconds, 6),
        "ports_scanned": result.ports_scanned,
        "answered": result.answered,
        "ports": [
            _port_to_json(port, state, services) for port, state in _port_rows(result, all_states)
        ],
    }


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(len(rows[0]) - 1)]
    return [
        "".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + row[-1]
        for row in rows
    ]


def result_to_table(
    result: ScanResult, *, all_states: bool = False, services: Services | None = None
) -> str:
    """The scan for people, with SERVICE and VERSION columns when `services` is given."""
    lines = [
        f"{result.host} ({result.address}): {result.ports_scanned} ports scanned in "
        f"{result.duration_seconds:.2f}s"
        + ("" if result.answered else ", no answer from the host (unreachable or all filtered)")
    ]
    rows = _port_rows(result, all_states)
    if not rows:
        lines.append("no open ports")
    elif services is None:
        lines.append(f"{'PORT':<10}STATE")
        lines += [f"{f'{port}/tcp':<10}{state}" for port, state in rows]
    else:
        table: list[tuple[str, ...]] = [("PORT", "STATE", "SERVICE", "VERSION")]
        for port, state in rows:
            identity = services.get(port, UNKNOWN_SERVICE) if state == "open" else None
            service = identity.service if identity is not None else ""
            version = (
                " ".join(w for w in (identity.product, identity.version) if w)
                if identity is not None
                else ""
            )
            table.append((f"{port}/tcp", state, service, version))
        lines += [line.rstrip() for line in _columns(table)]
    if not all_states:
        lines.append(f"closed: {len(result.closed)}, filtered: {len(result.filtered)}")
    return "\n".join(lines)
