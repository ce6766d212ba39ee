"""Command-line entry point: `portscan-exporter [COMMAND] ...` and `python -m exporter`.

Without a command it runs the exporter daemon, like node_exporter or blackbox_exporter; the
subcommands are one-shot tools around it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from exporter import __version__
from exporter.commands import baseline, check_config, history, run, scan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portscan-exporter",
        description="Continuous TCP port monitoring of your own hosts, exported to Prometheus. "
        "Without a command, runs the exporter.",
    )
    parser.add_argument("--version", action="version", version=f"portscan-exporter {__version__}")
    parser.add_argument(
        "--config.check",
        dest="config_check",
        metavar="FILE",
        help="validate FILE and exit 0 (valid) or 1 (invalid), like `check-config FILE`",
    )
    run.add_arguments(parser)
    parser.set_defaults(run=run.run)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, summary in (
        ("scan", scan, "scan one host once and print its open ports"),
        ("check-config", check_config, "validate a configuration file"),
        ("history", history, "when each port of a host opened and closed, from the store"),
        ("baseline", baseline, "act on the baseline of a host (accept)"),
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
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
