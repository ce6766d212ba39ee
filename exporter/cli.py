"""Command-line entry point: `portscan-exporter [COMMAND] ...` and `python -m exporter`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from exporter import __version__
from exporter.commands import check_config, scan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portscan-exporter",
        description="Continuous TCP port monitoring of your own hosts, exported to Prometheus.",
    )
    parser.add_argument("--version", action="version", version=f"portscan-exporter {__version__}")
    parser.add_argument(
        "--config.check",
        dest="config_check",
        metavar="FILE",
        help="validate FILE and exit 0 (valid) or 1 (invalid), like `check-config FILE`",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, summary in (
        ("scan", scan, "scan one host once and print its open ports"),
        ("check-config", check_config, "validate a configuration file"),
    ):
        sub = commands.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config_check:
        return check_config.check(args.config_check)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.run(args))
