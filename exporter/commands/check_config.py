"""`portscan-exporter check-config FILE`: validate without starting anything.

Besides what every load checks, this checks that the store can be opened or created where
`storage.path` says (a directory, /dev/null or an unwritable location is refused here rather
than when the daemon starts).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="configuration file to validate")


def run(args: argparse.Namespace) -> int:
    return check(args.file)


def check(path: str) -> int:
    # Imported here: the CLI loads every command module, and only this one needs YAML.
    from exporter.config import ConfigError, load_config

    try:
        config = load_config(path, check_paths=True)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    ports = sum(len(host.ports) for host in config.hosts)
    print(f"{path}: ok ({len(config.hosts)} hosts, {ports} host ports)")
    return 0
