"""The daemon under load: 1,000 targets on 127.0.0.0/8 aliases, top100 each.

Run as root: `python bench/daemon_load.py [--targets 1000] [--seconds 60]`.

Inside a private network namespace (every 127.x.y.z address is that namespace's own
loopback), a few listeners on 0.0.0.0 make each target host show open ports; they greet
every connection with an SSH banner, so identification is quick, as on a healthy fleet. The real
daemon runs there with a short interval; while it scans, this script scrapes /metrics every
`--scrape-every` seconds and samples the daemon's RSS. It prints the peak RSS, scrape
latency (median, p95, max), scrapes answered and scans finished.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemon_lab import DaemonProcess, Scrape, free_port_in  # noqa: E402
from tests.lab import NetNS, listeners, missing_root_reason  # noqa: E402

OPEN_PORTS = [22, 80, 443]
BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


def greet_forever(socks: list[socket.socket], stop: threading.Event) -> None:
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while not stop.is_set():
            for key, _ in selector.select(timeout=0.2):
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                try:
                    conn, _addr = listener.accept()
                except BlockingIOError:
                    continue
                with conn, contextlib.suppress(OSError):
                    conn.sendall(BANNER)


def config(state: Path, targets: int, interval: str) -> str:
    hosts = [f"127.{1 + i // 250}.{i % 250}.{1 + i % 7}" for i in range(targets)]
    lines = [
        "defaults:",
        "  ports: top100",
        f"  interval: {interval}",
        "  timeout: 500ms",
        "scan:",
        "  max_concurrent_hosts: 16",
        "storage:",
        f"  path: {state}",
        "targets:",
    ]
    lines += [f"  - {host}" for host in hosts]
    return "\n".join(lines) + "\n"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", default="30s")
    parser.add_argument("--scrape-every", type=float, default=0.5)
    args = parser.parse_args()
    if reason := missing_root_reason():
        print(f"bench: {reason}", file=sys.stderr)
        return 2
    stop = threading.Event()
    with (
        tempfile.TemporaryDirectory() as tmp,
        NetNS("load") as ns,
        listeners(ns, OPEN_PORTS, "0.0.0.0") as socks,
    ):
        greeter = threading.Thread(target=greet_forever, args=(socks, stop), daemon=True)
        greeter.start()
        path = Path(tmp) / "config.yaml"
        path.write_text(config(Path(tmp) / "state.sqlite", args.targets, args.interval))
        daemon = DaemonProcess(ns, path, free_port_in(ns), "--log.level", "warn")
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid  # `ip netns exec` execs the daemon: same process
        latencies: list[float] = []
        peak = 0.0
        scrape = Scrape("")
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            status, body = daemon.get("/metrics")
            latencies.append(time.monotonic() - started)
            if status == 200:
                scrape = Scrape(body.decode())
            peak = max(peak, rss_mib(pid))
            time.sleep(max(0.0, args.scrape_every - (time.monotonic() - started)))
        daemon.terminate()
        stop.set()
        greeter.join()
    scans = sum(s.value for s in scrape.samples if s.name == "portscan_scans_total")
    hosts_done = {s.labels["host"] for s in scrape.samples if s.name == "portscan_scans_total"}
    latencies.sort()
    p95 = latencies[int(len(latencies) * 0.95) - 1]
    print(f"targets={args.targets} ports=top100 interval={args.interval} run={args.seconds:.0f}s")
    print(f"scans finished: {scans:.0f} ({len(hosts_done)} distinct hosts)")
    print(f"peak RSS: {peak:.1f} MiB")
    print(
        f"/metrics: {len(latencies)} scrapes, median {statistics.median(latencies) * 1000:.1f} ms,"
        f" p95 {p95 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms,"
        f" {len(scrape.text) / 1024:.0f} KiB last exposition"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
