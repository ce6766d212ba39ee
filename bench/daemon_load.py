"""The daemon under load: 1,000 targets on 127.0.0.0/8 aliases, top100 each, scraped hard.

Run as root: `python bench/daemon_load.py [--targets 1000] [--seconds 30] [--scrapers 50]`.

Inside a private network namespace (every 127.x.y.z address is that namespace's own
loopback), a few listeners on 0.0.0.0 make each target host show open ports; they greet
every connection with an SSH banner, so identification is quick, as on a healthy fleet. The real
daemon runs there with a short interval, so it always has hosts due and scans as fast as it
can: scans finished per second is its scanning capacity.

The run has two phases of `--seconds` each, after a short warm-up. In the first nobody
scrapes; in the second `--scrapers` clients scrape /metrics back to back (asking for gzip, as
Prometheus does). Each phase is bracketed by a scrape that reads `portscan_scans_total`, so
the script prints scans/s in both phases and their ratio: scraping must not starve scanning.
It also prints scrape latency under load (median, p95, max), the daemon's peak RSS and the
size of the exposition. `--source DIR` runs the `exporter` package found in DIR instead of
this tree's, to compare with an earlier version on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.client
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

from tests.daemon_lab import DaemonProcess, free_port_in  # noqa: E402
from tests.lab import NetNS, listeners, missing_root_reason  # noqa: E402

OPEN_PORTS = [22, 80, 443]
BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
WARM_UP_SECONDS = 5.0


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


def scans_total(body: bytes) -> float:
    """Sum of `portscan_scans_total` over hosts and results (a line scan: no full parse)."""
    return sum(
        float(line.rsplit(b" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(b"portscan_scans_total{")
    )


class Scraper:
    """One client scraping /metrics back to back over a kept-alive connection."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        self.port, self.stop = port, stop
        self.latencies: list[float] = []
        self.slowest = (0.0, 0.0)  # (latency, when it started, on the monotonic clock)
        self.failures = 0
        self.size = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
                    response = conn.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException):
                    self.failures += 1
                    conn.close()
                    continue
                if response.status != 200:
                    self.failures += 1
                    continue
                latency = time.monotonic() - started
                self.latencies.append(latency)
                self.slowest = max(self.slowest, (latency, started))
                self.size = len(body)
        finally:
            conn.close()


def count_scans(daemon: DaemonProcess) -> tuple[float, float, bytes]:
    """(when asked, scans finished so far, body) from one uncompressed scrape."""
    asked = time.monotonic()
    status, body = daemon.get("/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return asked, scans_total(body), body


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * fraction) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--interval", default="30s")
    parser.add_argument("--scrapers", type=int, default=50)
    parser.add_argument("--source", type=Path, help="directory holding another `exporter`")
    args = parser.parse_args()
    if reason := missing_root_reason():
        print(f"bench: {reason}", file=sys.stderr)
        return 2
    stop_greeting = threading.Event()
    peak = 0.0
    with (
        tempfile.TemporaryDirectory() as tmp,
        NetNS("load") as ns,
        listeners(ns, OPEN_PORTS, "0.0.0.0") as socks,
    ):
        greeter = threading.Thread(target=greet_forever, args=(socks, stop_greeting), daemon=True)
        greeter.start()
        path = Path(tmp) / "config.yaml"
        path.write_text(config(Path(tmp) / "state.sqlite", args.targets, args.interval))
        port = free_port_in(ns)
        daemon = DaemonProcess(ns, path, port, "--log.level", "warn", source=args.source)
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid  # `ip netns exec` execs the daemon: same process

        def sleep_sampling(seconds: float) -> None:
            nonlocal peak
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                peak = max(peak, rss_mib(pid))
                time.sleep(min(0.5, left))

        sleep_sampling(WARM_UP_SECONDS)
        idle_start, idle_first, _ = count_scans(daemon)
        sleep_sampling(args.seconds)
        idle_end, idle_last, _ = count_scans(daemon)

        stop_scraping = threading.Event()
        scrapers = [Scraper(port, stop_scraping) for _ in range(args.scrapers)]
        threads = [
            threading.Thread(target=ns.call, args=(scraper.run,), daemon=True)
            for scraper in scrapers
        ]
        for thread in threads:
            thread.start()
        loaded_start, loaded_first, _ = count_scans(daemon)
        sleep_sampling(args.seconds)
        loaded_end, loaded_last, body = count_scans(daemon)
        stop_scraping.set()
        for thread in threads:
            thread.join()
        daemon.terminate()
        stop_greeting.set()
        greeter.join()

    idle_rate = (idle_last - idle_first) / (idle_end - idle_start)
    loaded_rate = (loaded_last - loaded_first) / (loaded_end - loaded_start)
    latencies = [latency for scraper in scrapers for latency in scraper.latencies]
    failures = sum(scraper.failures for scraper in scrapers)
    slowest, slowest_at = max(scraper.slowest for scraper in scrapers)
    print(
        f"targets={args.targets} ports=top100 interval={args.interval}"
        f" phases={args.seconds:.0f}s scrapers={args.scrapers}"
    )
    print(f"scans/s with 0 scrapers: {idle_rate:.2f}")
    print(f"scans/s with {args.scrapers} scrapers: {loaded_rate:.2f}")
    print(f"ratio: {loaded_rate / idle_rate:.2f}x" if idle_rate else "ratio: n/a (no scans)")
    if latencies:
        print(
            f"/metrics under load: {len(latencies)} scrapes ({failures} failed),"
            f" p50 {statistics.median(latencies) * 1000:.1f} ms,"
            f" p95 {percentile(latencies, 0.95) * 1000:.1f} ms,"
            f" max {slowest * 1000:.1f} ms ({slowest_at - loaded_start:+.1f} s into the phase)"
        )
    else:
        print(f"/metrics under load: no scrape answered ({failures} failed)")
    compressed = len(gzip.compress(body))
    print(
        f"exposition: {len(body) / 1024:.0f} KiB ({compressed / 1024:.0f} KiB gzipped),"
        f" {scans_total(body):.0f} scans in all; peak RSS: {peak:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
