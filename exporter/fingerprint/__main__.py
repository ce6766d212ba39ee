"""Identify services from the command line, the way the exporter would.

    python -m exporter.fingerprint 192.0.2.10 22,80,443,8000-8010
    python -m exporter.fingerprint --json --server-name www.example.org \\
        --nmap-service-probes /usr/share/nmap/nmap-service-probes 192.0.2.10 443

Only point it at hosts you are responsible for.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .engine import FingerprintOptions, Identification, identify_ports_detailed, load_signatures
from .signatures import PortRanges
from .tls import iso_timestamp


def _ports(text: str) -> list[int]:
    try:
        ranges = PortRanges.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    ports = sorted({port for low, high in ranges.ranges for port in range(low, high + 1)})
    if not ports or len(ports) > 4096 or ports[0] < 1:
        raise argparse.ArgumentTypeError("give between 1 and 4096 ports in 1-65535")
    return ports


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.fingerprint",
        description="Identify the services on open TCP ports of one host.",
    )
    parser.add_argument("address", help="IP address (or name) to connect to")
    parser.add_argument("ports", type=_ports, help="ports, e.g. 22,80,8000-8010")
    parser.add_argument("--server-name", help="DNS name for SNI and the HTTP Host header")
    parser.add_argument("--nmap-service-probes", type=Path, help="also use nmap's database")
    defaults = FingerprintOptions()
    parser.add_argument("--timeout", type=float, default=defaults.timeout)
    parser.add_argument("--max-bytes", type=int, default=defaults.max_bytes)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--no-starttls", action="store_true", help="skip STARTTLS upgrades")
    parser.add_argument("--json", action="store_true", help="one JSON object per port")
    return parser


def _record(result: Identification) -> dict[str, object]:
    identity = result.identity
    record: dict[str, object] = {
        "port": result.port,
        "service": identity.service,
        "product": identity.product,
        "version": identity.version,
        "extra": identity.extra,
        "fingerprint": identity.fingerprint,
        "banner": identity.banner,
        "tls": dataclasses.asdict(identity.tls) if identity.tls else None,
        "duration_seconds": round(result.duration_seconds, 4),
        "bytes_read": result.bytes_read,
        "probes_sent": result.probes_sent,
        "timed_out": result.timed_out,
    }
    return record


def _line(result: Identification) -> str:
    identity = result.identity
    words = [f"{result.port:>5}/tcp", f"{identity.service:<12}", identity.product]
    if identity.version:
        words.append(identity.version)
    if identity.extra:
        words.append(f"({identity.extra})")
    if identity.tls is not None:
        tls = identity.tls
        expiry = iso_timestamp(tls.not_after) if tls.not_after else "?"
        words.append(f"[{tls.protocol} {tls.subject} until {expiry}]")
    return " ".join(word for word in words if word)


async def _run(args: argparse.Namespace) -> int:
    options = FingerprintOptions(
        timeout=args.timeout,
        max_bytes=args.max_bytes,
        concurrency=args.concurrency,
        nmap_service_probes=args.nmap_service_probes,
        starttls=not args.no_starttls,
    )
    db = load_signatures(options)
    started = time.monotonic()
    results = await identify_ports_detailed(
        args.address, args.ports, db=db, options=options, server_name=args.server_name
    )
    for result in results.values():
        print(json.dumps(_record(result)) if args.json else _line(result))
    if not args.json:
        print(f"# {len(results)} ports in {time.monotonic() - started:.2f} s", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
