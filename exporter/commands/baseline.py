"""`portscan-exporter baseline accept --host H [--port P]`: a confirmed change is legitimate."""

from __future__ import annotations

import argparse
import sys
import time

from exporter.commands.history import add_config_argument, open_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    accept = actions.add_parser(
        "accept",
        help="make the current confirmed state the baseline of a host (or one port)",
        description="Make the current confirmed state the baseline of a host (or one port). "
        "Works while the exporter runs; it picks the change up within seconds.",
    )
    accept.add_argument("--host", required=True)
    accept.add_argument("--port", type=int, default=None)
    add_config_argument(accept)


def run(args: argparse.Namespace) -> int:
    from exporter.config import ConfigError
    from exporter.state import AcceptRefused

    try:
        store = open_store(args.config)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"portscan-exporter baseline: {exc}", file=sys.stderr)
        return 1
    with store:
        try:
            state = store.accept(args.host, args.port, now=time.time())
        except AcceptRefused as exc:
            print(f"portscan-exporter baseline: {exc}", file=sys.stderr)
            return 1
    ports = ", ".join(str(p) for p in sorted(state.baseline)) or "none"
    what = f"port {args.port} of {args.host}" if args.port is not None else args.host
    print(f"baseline of {what} accepted; baseline ports of {args.host}: {ports}")
    return 0
