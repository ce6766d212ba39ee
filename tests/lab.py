"""Test hosts in network namespaces: private loopbacks with their own firewall.

Everything a test scans lives inside a namespace the test created, so the scans never touch
services on this machine that are not ours. A namespace's 127.0.0.0/8 and ::1 are its own;
every 127.x.y.z address can act as a separate host with its own iptables rules.

Code runs inside a namespace either as a subprocess (`ip netns exec`) or, for the scanner
itself, in a thread that joined the namespace with setns(2): network namespaces are a
per-thread property on Linux, and sockets keep the namespace they were created in.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_counter = itertools.count()


def missing_root_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces and iptables"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (Debian package {'iproute2' if tool == 'ip' else tool})"
    return None


requires_netns = pytest.mark.skipif(
    missing_root_reason() is not None, reason=missing_root_reason() or ""
)


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetNS:
    """A network namespace with its loopback up; deleted (with its processes) on exit."""

    def __init__(self, prefix: str = "pst") -> None:
        self.name = f"{prefix}{os.getpid()}x{next(_counter)}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> NetNS:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run("ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        pids = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def spawn(self, *cmd: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kwargs)
        self.processes.append(proc)
        return proc

    def iptables(self, *rule: str, v6: bool = False) -> None:
        self.run("ip6tables" if v6 else "iptables", "-w", *rule)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in a thread inside this namespace and return its result."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                _setns(f"/var/run/netns/{self.name}")
                box["result"] = fn(*args)
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["result"]  # type: ignore[no-any-return]

    def listen(
        self, port: int, address: str = "127.0.0.1", family: int = socket.AF_INET
    ) -> socket.socket:
        """A listening socket inside the namespace (closed by the caller)."""

        def make() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(128)
            return sock

        return self.call(make)


@contextlib.contextmanager
def listeners(
    ns: NetNS, ports: list[int], address: str = "127.0.0.1", family: int = socket.AF_INET
) -> Iterator[list[socket.socket]]:
    socks = [ns.listen(port, address, family) for port in ports]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()
