"""Full-range TCP scan: portscan-exporter against nmap, in one run, on the same lab.

Run as root (network namespaces, iptables): `make bench` or `python bench/scan_vs_nmap.py`.

The lab is one network namespace with listeners on a few ports (bound to 0.0.0.0 there) and
three "hosts" on its private loopback, each with its own firewall:
  loopback  127.0.0.1  no firewall: every other port answers RST
  dropped   127.0.0.2  SYNs to ports 1-45000 silently DROPped (except the listeners)
  lossy     127.0.0.3  5% of the SYNs sent to it dropped at random
Each tool runs as a whole process inside the namespace (`ip netns exec`), alternating, so
both pay their own start-up and see the same machine load. Medians of --runs runs are
printed with the ratio ours/nmap and whether the open-port sets are identical.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.lab import NetNS, listeners, missing_root_reason  # noqa: E402

OPEN_PORTS = [22, 25, 80, 443, 3306, 5432, 6379, 8080, 9100, 31337, 50001]
PROFILES = {
    "loopback": "127.0.0.1",
    "dropped": "127.0.0.2",
    "lossy": "127.0.0.3",
}


@dataclass
class Timings:
    walls: list[float] = field(default_factory=list)
    open_sets: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


def firewall(ns: NetNS) -> None:
    accept = ",".join(str(p) for p in OPEN_PORTS if p <= 45000)
    ns.iptables(
        "-A",
        "INPUT",
        "-d",
        "127.0.0.2",
        "-p",
        "tcp",
        "-m",
        "multiport",
        "--dports",
        accept,
        "-j",
        "ACCEPT",
    )
    ns.iptables(
        "-A", "INPUT", "-d", "127.0.0.2", "-p", "tcp", "--syn", "--dport", "1:45000", "-j", "DROP"
    )
    ns.iptables(
        "-A",
        "INPUT",
        "-d",
        "127.0.0.3",
        "-p",
        "tcp",
        "--syn",
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        "0.05",
        "-j",
        "DROP",
    )


def ours(ns: NetNS, host: str, concurrency: int, retries: int) -> tuple[float, tuple[int, ...]]:
    cmd = [
        sys.executable,
        "-m",
        "exporter",
        "scan",
        host,
        "--ports",
        "all",
        "--format",
        "json",
        "--concurrency",
        str(concurrency),
        "--retries",
        str(retries),
        "--no-identify",  # nmap -sT does not identify services either
    ]
    started = time.monotonic()
    proc = ns.run(*cmd)
    wall = time.monotonic() - started
    result = json.loads(proc.stdout)
    return wall, tuple(p["port"] for p in result["ports"] if p["state"] == "open")


def nmap(ns: NetNS, host: str, mode: str) -> tuple[float, tuple[int, ...]]:
    started = time.monotonic()
    # nmap slows itself down a lot when it sees loss: give it time.
    proc = ns.run("nmap", mode, "-Pn", "-n", "-p-", "-oX", "-", host, timeout=900)
    wall = time.monotonic() - started
    tree = ET.fromstring(proc.stdout)
    found = [
        int(port.get("portid", "0"))
        for port in tree.iter("port")
        if (state := port.find("state")) is not None and state.get("state") == "open"
    ]
    return wall, tuple(sorted(found))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma list")
    parser.add_argument("--nmap-modes", default="-sT,-sS", help="comma list of nmap scan types")
    parser.add_argument("--concurrency", type=int, default=4096)
    parser.add_argument("--retries", type=int, default=1)
    args = parser.parse_args()
    if reason := missing_root_reason():
        print(f"bench: {reason}", file=sys.stderr)
        return 2
    profiles = args.profiles.split(",")
    modes = args.nmap_modes.split(",")
    print(
        f"# {os.cpu_count()} cores; {args.runs} runs per tool; ours: --concurrency "
        f"{args.concurrency} --retries {args.retries}; nmap defaults (-T3) -Pn -n -p-"
    )
    print(
        f"{'profile':<10}{'tool':<10}{'median s':>10}{'min':>8}{'max':>8}"
        f"{'ratio':>8}  identical open sets"
    )
    failures = 0
    with NetNS("bench") as ns, listeners(ns, OPEN_PORTS, "0.0.0.0"):
        firewall(ns)
        expected = tuple(OPEN_PORTS)
        for profile in profiles:
            host = PROFILES[profile]
            tools: dict[str, Callable[[], tuple[float, tuple[int, ...]]]] = {
                "ours": functools.partial(ours, ns, host, args.concurrency, args.retries)
            }
            for mode in modes:
                tools[f"nmap{mode}"] = functools.partial(nmap, ns, host, mode)
            timings = {name: Timings() for name in tools}
            for _ in range(args.runs):
                for name, tool in tools.items():
                    wall, found = tool()
                    timings[name].walls.append(wall)
                    timings[name].open_sets.append(found)
            for name, t in timings.items():
                identical = all(s == expected for s in t.open_sets)
                failures += not identical
                ratio = t.median / timings["nmap-sT"].median if "nmap-sT" in timings else 0
                detail = "yes" if identical else f"NO: {sorted(set(t.open_sets))}"
                print(
                    f"{profile:<10}{name:<10}{t.median:>10.2f}{min(t.walls):>8.2f}"
                    f"{max(t.walls):>8.2f}{ratio:>8.2f}  {detail}"
                )
    print("# ratio = median wall time / nmap -sT median wall time (whole processes)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
