"""Service identification: portscan-exporter against `nmap -sV`, in one run, on the same lab.

Run as root: `python bench/fingerprint_vs_nmap.py [--runs 3]`.

The lab (tests/services/lab.py) is one network namespace running real Debian daemons on their
standard ports: nginx (80, 443 with TLS, 8080), OpenSSH, Postfix (25, 465), Dovecot (110, 143,
993, 995), vsftpd, MariaDB, PostgreSQL, Redis and memcached. Each run identifies every port
three ways, in the same order each time:

  ours       the engine in this process (what the daemon pays per scan)
  ours-cli   `python -m exporter scan --format json` as a whole process inside the
             namespace: interpreter start-up, database loading and a TCP scan of the same
             ports included, like nmap's own start-up and port scan
  nmap       `nmap -sV -Pn -n -p PORTS -oX - 127.0.0.1` inside the namespace

With --nmap-service-probes PATH, two more rows use our engine with nmap's database merged
in (`ours+nmapdb` in this process, `ours-cli+nmapdb` including loading that database).

It prints the median wall time of each, the ratios, a per-port table (ours against nmap's
service/product/version, parsed from its XML) flagging ports nmap names and we do not, and
whether our fingerprints stayed identical across runs. The exit status is 1 when a port is
missed, a fingerprint changed, or the CLI's median exceeds a quarter of nmap's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.fingerprint import Fingerprinter, FingerprintOptions, SignatureDB  # noqa: E402
from exporter.model import ServiceIdentity  # noqa: E402
from tests.services.lab import ADDRESS, ServiceLab, unavailable_reason  # noqa: E402

TARGET_RATIO = 0.25


@dataclass(frozen=True, slots=True)
class NmapService:
    name: str  # "" when nmap names nothing
    product: str
    version: str
    tunnel: str  # "ssl" when nmap spoke TLS first
    method: str  # "probed", or "table" when only guessed from the port number

    @property
    def label(self) -> str:
        if not self.name:
            return "-"
        name = f"{self.tunnel}/{self.name}" if self.tunnel else self.name
        guess = "?" if self.method == "table" else ""
        return " ".join(part for part in (name + guess, self.product, self.version) if part)


@dataclass
class Runs:
    walls: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


def parse_nmap_xml(text: str) -> dict[int, NmapService]:
    services: dict[int, NmapService] = {}
    for port in ET.fromstring(text).iter("port"):
        element = port.find("service")
        get = element.get if element is not None else (lambda _key, default="": default)
        services[int(port.get("portid", "0"))] = NmapService(
            name=get("name", ""),
            product=get("product", ""),
            version=get("version", ""),
            tunnel=get("tunnel", ""),
            method=get("method", ""),
        )
    return services


def label(identity: ServiceIdentity) -> str:
    return " ".join(p for p in (identity.service, identity.product, identity.version) if p)


def run_nmap(lab: ServiceLab, ports: str) -> tuple[float, dict[int, NmapService]]:
    started = time.monotonic()
    out = lab.ns.run("nmap", "-sV", "-Pn", "-n", "-p", ports, "-oX", "-", ADDRESS).stdout
    return time.monotonic() - started, parse_nmap_xml(out)


def run_cli(lab: ServiceLab, ports: str, *extra: str) -> tuple[float, dict[int, str]]:
    started = time.monotonic()
    out = lab.ns.run(
        "env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "exporter", "scan", ADDRESS,
        "--ports", ports, "--format", "json", *extra,
    ).stdout  # fmt: skip
    wall = time.monotonic() - started
    records = json.loads(out)["ports"]
    return wall, {int(r["port"]): str(r["fingerprint"]) for r in records}


async def run_ours(
    lab: ServiceLab, ports: list[int], db: SignatureDB
) -> tuple[float, dict[int, ServiceIdentity]]:
    started = time.monotonic()
    fingerprinter = Fingerprinter(db, FingerprintOptions(), dialer=lab.dial)
    results = await fingerprinter.identify_ports(ADDRESS, ports)
    return time.monotonic() - started, {p: r.identity for p, r in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nmap-service-probes", type=Path, help="also time the merged database")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"cannot build the lab: {reason}", file=sys.stderr)
        return 2
    if shutil.which("nmap") is None:
        print("nmap is not installed (Debian package nmap)", file=sys.stderr)
        return 2

    db = SignatureDB.builtin()
    timings = {"ours": Runs(), "ours-cli": Runs(), "nmap": Runs()}
    merged_db: SignatureDB | None = None
    if args.nmap_service_probes is not None:
        merged_db = db.merged_with_nmap(args.nmap_service_probes)
        timings.update({"ours+nmapdb": Runs(), "ours-cli+nmapdb": Runs()})
    fingerprints: dict[int, set[str]] = {}
    with ServiceLab() as lab:
        for name, why in {**lab.skipped, **lab.failed}.items():
            print(f"# {name} not in the lab: {why}", file=sys.stderr)
        ports = sorted(lab.ports)
        port_list = ",".join(map(str, ports))
        ours: dict[int, ServiceIdentity] = {}
        nmap: dict[int, NmapService] = {}
        for run in range(args.runs):
            wall, ours = asyncio.run(run_ours(lab, ports, db))
            timings["ours"].walls.append(wall)
            for port, identity in ours.items():
                fingerprints.setdefault(port, set()).add(identity.fingerprint)
            wall, cli = run_cli(lab, port_list)
            timings["ours-cli"].walls.append(wall)
            for port, fingerprint in cli.items():
                fingerprints.setdefault(port, set()).add(fingerprint)
            wall, nmap = run_nmap(lab, port_list)
            timings["nmap"].walls.append(wall)
            if merged_db is not None:
                wall, merged = asyncio.run(run_ours(lab, ports, merged_db))
                timings["ours+nmapdb"].walls.append(wall)
                for port, identity in merged.items():
                    fingerprints.setdefault(port, set()).add(identity.fingerprint)
                nmapdb = ("--nmap-service-probes", str(args.nmap_service_probes))
                wall, cli = run_cli(lab, port_list, *nmapdb)
                timings["ours-cli+nmapdb"].walls.append(wall)
            print(
                f"# run {run + 1}: "
                + ", ".join(f"{name} {t.walls[-1]:.2f} s" for name, t in timings.items()),
                file=sys.stderr,
            )

    missed = []
    print(f"{'port':>5}  {'portscan-exporter':<42} {'nmap -sV':<44} flag")
    for port in ports:
        mine, theirs = ours[port], nmap.get(port, NmapService("", "", "", "", ""))
        flags = []
        if theirs.name and mine.service == "unknown":
            flags.append("MISSED")
            missed.append(port)
        if len(fingerprints[port]) > 1:
            flags.append("UNSTABLE")
        if not theirs.name or theirs.method == "table":
            flags.append("nmap-guess" if theirs.name else "nmap-none")
        print(f"{port:>5}  {label(mine):<42} {theirs.label:<44} {' '.join(flags)}")

    nmap_median = timings["nmap"].median
    print()
    for name, runs in timings.items():
        walls = " ".join(f"{w:.2f}" for w in runs.walls)
        ratio = runs.median / nmap_median
        print(f"{name:<15} median {runs.median:6.2f} s  ratio {ratio:5.3f}  (runs: {walls})")
    unstable = [port for port, seen in fingerprints.items() if len(seen) > 1]
    print(f"ports missed where nmap names a service: {missed or 'none'}")
    print(f"ports whose fingerprint changed between runs: {unstable or 'none'}")
    too_slow = timings["ours-cli"].median > TARGET_RATIO * nmap_median
    return 1 if missed or unstable or too_slow else 0


if __name__ == "__main__":
    sys.exit(main())
