"""The folders show the data flow, and the imports keep it that way.

config -> scanner -> fingerprint -> state -> store -> daemon (snapshot) -> web. Each rule below
is one arrow that must not point backwards; imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"

# What the pure state machine may not touch: sockets, the event loop, files, the database,
# the clock, threads, randomness.
IO_MODULES = {
    "asyncio",
    "os",
    "pathlib",
    "random",
    "select",
    "socket",
    "sqlite3",
    "ssl",
    "subprocess",
    "threading",
    "time",
    "uvloop",
    "aiohttp",
    "structlog",
    "logging",
}


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, absolute, at any depth of the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def modules_in(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def offending(subpackage: str, forbidden: set[str] | tuple[str, ...]) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for path in modules_in(subpackage):
        hits = sorted(
            name
            for name in imports_of(path)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
        )
        if hits:
            bad[str(path.relative_to(PACKAGE.parent))] = hits
    return bad


def test_the_state_machine_does_no_io() -> None:
    assert modules_in("state")
    assert offending("state", IO_MODULES) == {}


@pytest.mark.parametrize(
    ("subpackage", "forbidden"),
    [
        # The daemon serves nobody: web/ reads it through daemon.snapshot only.
        ("daemon", ("exporter.web", "aiohttp")),
        # Scanner and fingerprinter return values; they never touch state, store or metrics.
        ("scanner", ("exporter.state", "exporter.store", "exporter.daemon", "exporter.web")),
        ("fingerprint", ("exporter.state", "exporter.store", "exporter.daemon", "exporter.web")),
        ("state", ("exporter.store", "exporter.daemon", "exporter.web", "exporter.scanner")),
        ("store", ("exporter.daemon", "exporter.web", "exporter.scanner", "exporter.fingerprint")),
    ],
)
def test_no_layer_imports_a_later_one(subpackage: str, forbidden: tuple[str, ...]) -> None:
    assert offending(subpackage, forbidden) == {}


def test_web_reads_the_daemon_only_through_the_snapshot() -> None:
    internals = ("exporter.daemon.runner", "exporter.daemon.schedule", "exporter.daemon.pipeline")
    assert offending("web", internals) == {}


def test_commands_use_no_daemon_internals_but_the_runner() -> None:
    internals = ("exporter.daemon.schedule", "exporter.daemon.pipeline", "exporter.daemon.snapshot")
    assert offending("commands", internals) == {}


def test_the_checks_see_imports_inside_functions() -> None:
    run = PACKAGE / "commands" / "run.py"
    assert "exporter.daemon.runner" in imports_of(run)  # imported inside `_serve`
    assert "exporter.web.listen.start_server" in imports_of(run)
