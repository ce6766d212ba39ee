"""The daemon as a fleet scanner: one round over many hosts, side by side with nmap.

Run as root: `python bench/fleet_vs_nmap.py [--workloads 1,2,3,4] [--runs 3]
[--growth 1000,4000,16000,65536] [--identify] [--source DIR] [--scale 1]`.

The lab is one private network namespace whose loopback answers for all of 10.83.0.0/16 (a
`local` route: every address of the block is the namespace's own, and listeners bind to any of
them). Nothing leaves it: its only interface is `lo`. One listener process there (a selectors
loop that accepts and closes every connection) holds, on specific address:port pairs drawn
with a fixed seed:
  fleet         10.83.0.1 ... (1,024 hosts)  2,352 listeners on top100 ports, no firewall
  firewalled    10.83.254.0/24 (256 hosts)   2 listeners each (top100 ports); every other SYN
                                             to them is DROPped (they answer on open ports only)
  half dropped  10.83.255.1-16 (16 hosts)    2 listeners each; SYNs to ports 32768-65535 DROPped
                                             except to the listeners
The namespace's ephemeral ports are set to the widest range no top1000 port falls in, so a
connect() can never be answered by itself (Linux "self-connect"): the half-dropped hosts,
scanned on every port, drop the SYNs into that range.

Workloads (table rows), each run `--runs` times with the tools interleaved (run 1: ours, nmap
-sT, nmap -sS; run 2 rotated; ...):
  1. 1,024 hosts x top100    2. 1,024 hosts x top1000    3. 256 firewalled hosts x top1000
  4. 16 hosts x 1-65535, half of the ports dropped
"ours" is the real daemon (`python -m exporter`, from `--source DIR` if given) inside the
namespace with those targets, the port set, `interval: 1h`, `jitter: 0s` (so the first round is
not spread out), fingerprinting off (`--identify`: on, and nmap -sV timed too), a fresh store and
every other setting at its default. Its time is one round: from the first scan's start to the
end of the last host's first scan (the hosts' `last_scan` in /api/v1/hosts, wall clock); the end
is noticed by counting per-scan lines in its log, so nothing scrapes it meanwhile. Its start-up
(process start to first scan) is shown apart, and its CPU seconds are the process's at the end
of the round (/proc/PID/stat). nmap runs as `nmap -sT|-sS -T4 -n -Pn -p <the exact port list the
port set resolves to> -iL <targets> -oX -`, whole process timed, CPU from getrusage. The table
has medians, ratios ours/nmap and whether every tool found exactly the lab's listeners in every
run (the differences are listed below it when not).

Cost growth (`--growth`, 0 or empty to skip): the daemon alone on the first N addresses of the
block x top100 (65536: the whole /16; the firewall is off for these), one round each. Printed per
N: round time, CPU seconds per 1,000 host-scans, peak RSS (VmHWM), the latency of GET /metrics
(gzip, as Prometheus asks) and of GET /api/v1/hosts sampled by one client every 2 s while
scanning (median, p95, max, count), and the exposition once the round is done (bytes plain and
gzipped, sample lines). A round still running after `--round-timeout` seconds is reported as
not finished, with how many hosts had finished; the same limit ends an nmap run.

`--scale F` shrinks every workload's hosts and listeners by F (for trying the bench quickly);
`--source DIR` runs the `exporter` package found in DIR instead of this tree's, to compare
versions on the same machine. Ctrl-C or an error tears everything down (processes, namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import http.client
import ipaddress
import json
import os
import platform
import random
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.portsets import MAX_PORT, resolve_ports  # noqa: E402
from tests.daemon_lab import DaemonProcess, free_port_in  # noqa: E402
from tests.lab import NetNS, missing_root_reason  # noqa: E402

BLOCK = ipaddress.IPv4Network("10.83.0.0/16")
FLEET_HOSTS = 1024
FLEET_LISTENERS = 2352
FIREWALLED_FIRST = ipaddress.IPv4Address("10.83.254.0")
FIREWALLED_HOSTS = 256
HALF_DROPPED_FIRST = ipaddress.IPv4Address("10.83.255.1")
HALF_DROPPED_HOSTS = 16
OPEN_PER_HOST = 2  # listeners on each firewalled and each half-dropped host
DROPPED_HALF = (32768, MAX_PORT)
SEED = 1083
LISTEN_BACKLOG = 4096
INTERVAL = "1h"
DEFAULT_GROWTH = "1000,4000,16000,65536"
SAMPLE_EVERY_SECONDS = 2.0
LOG_POLL_SECONDS = 0.2
# When the log shows no progress for this long, /api/v1/hosts is asked how many hosts are
# done: the round still ends if the per-scan log lines were ever renamed.
API_FALLBACK_SECONDS = 15.0
HTTP_TIMEOUT_SECONDS = 300.0
# Log events that end a host's scan, finished or not (exporter/daemon/reporting.py).
SCAN_ENDINGS = frozenset({"scan finished", "scan failed", "store write failed, scan not recorded"})
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # linux/in.h; not every Python names it

Pair = tuple[str, int]  # (address, port) of an open port


# --- the lab ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lab:
    fleet: tuple[str, ...]
    firewalled: tuple[str, ...]
    half_dropped: tuple[str, ...]
    listeners: frozenset[Pair]
    ephemeral: tuple[int, int]  # the namespace's ip_local_port_range


def addresses(first: ipaddress.IPv4Address, count: int) -> tuple[str, ...]:
    found = tuple(str(first + i) for i in range(count))
    if count and ipaddress.IPv4Address(found[-1]) not in BLOCK:
        raise ValueError(f"{count} hosts from {first} leave {BLOCK}")
    return found


def block_prefix(count: int) -> tuple[str, ...]:
    """The first `count` addresses of the block from 10.83.0.1 on; 65536 is the whole block."""
    if not 1 <= count <= BLOCK.num_addresses:
        raise ValueError(f"between 1 and {BLOCK.num_addresses} targets, got {count}")
    start = 1 if count < BLOCK.num_addresses else 0
    return addresses(BLOCK.network_address + start, count)


def scaled(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def widest_gap(taken: set[int], low: int, high: int) -> tuple[int, int]:
    """The longest run of ports in low..high that holds none of `taken`."""
    best, start = (low, low - 1), low
    for port in [*sorted(p for p in taken if low <= p <= high), high + 1]:
        if port - start > best[1] - best[0] + 1:
            best = (start, port - 1)
        start = port + 1
    return best


def build_lab(scale: float) -> Lab:
    rng = random.Random(SEED)
    top100 = resolve_ports("top100")
    fleet = block_prefix(scaled(FLEET_HOSTS, scale))
    picks = rng.sample(
        range(len(fleet) * len(top100)),
        min(scaled(FLEET_LISTENERS, scale), len(fleet) * len(top100)),
    )
    pairs = {(fleet[i // len(top100)], top100[i % len(top100)]) for i in picks}
    firewalled = addresses(FIREWALLED_FIRST, scaled(FIREWALLED_HOSTS, scale))
    for host in firewalled:
        pairs.update((host, port) for port in rng.sample(top100, OPEN_PER_HOST))
    # Ephemeral ports: in the dropped half (so that a self-connect SYN is dropped on the hosts
    # scanned on every port) and clear of every top1000 port (the other workloads').
    ephemeral = widest_gap(set(resolve_ports("top1000")), *DROPPED_HALF)
    half_dropped = addresses(HALF_DROPPED_FIRST, scaled(HALF_DROPPED_HOSTS, scale))
    for host in half_dropped:
        # One below the dropped half, one in it (it must be found through the firewall).
        pairs.add((host, rng.randint(1024, DROPPED_HALF[0] - 1)))
        pairs.add((host, rng.randint(DROPPED_HALF[0], MAX_PORT)))
    return Lab(fleet, firewalled, half_dropped, frozenset(pairs), ephemeral)


def serve_listeners(pairs_file: Path) -> int:
    """The listener process (inside the namespace): accept and close, until stdin closes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # thousands of listeners
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks: list[socket.socket] = []
    for line in pairs_file.read_text().split():
        address, port = line.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, int(port)))
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            # A kernel that does not treat the whole `local` block as bindable.
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            sock.bind((address, int(port)))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        socks.append(sock)
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ, sock)
        selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
        print(f"listening on {len(socks)}", flush=True)
        while True:
            for key, _ in selector.select():
                listener = key.data
                if listener is None:  # stdin: the bench is gone or done
                    if not os.read(sys.stdin.fileno(), 4096):
                        return 0
                    continue
                assert isinstance(listener, socket.socket)
                while True:  # drain the backlog: scanners connect in bursts
                    try:
                        conn, _addr = listener.accept()
                    except (BlockingIOError, ConnectionAbortedError):
                        break
                    conn.close()


@contextlib.contextmanager
def listener_process(ns: NetNS, lab: Lab, tmp: Path) -> Iterator[None]:
    pairs_file = tmp / "listeners.txt"
    pairs_file.write_text("".join(f"{host}:{port}\n" for host, port in sorted(lab.listeners)))
    proc = ns.spawn(
        sys.executable, str(Path(__file__).resolve()), "--serve-listeners", str(pairs_file),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    if not proc.stdout.readline().startswith(b"listening"):
        raise RuntimeError(f"the listener process failed (exit {proc.wait()})")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # its end: it returns by itself
        deadline = time.monotonic() + 10
        while not exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        signal_unreaped(proc, signal.SIGKILL)
        proc.poll()


def make_namespace(ns: NetNS, lab: Lab) -> None:
    links = ns.run("ip", "-o", "link", "show").stdout.splitlines()
    names = [line.split(":")[1].strip() for line in links]
    if names != ["lo"]:
        raise RuntimeError(f"namespace {ns.name} has interfaces besides lo: {names}")
    ns.run("ip", "route", "add", "local", str(BLOCK), "dev", "lo")
    ns.run(
        "sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={lab.ephemeral[0]} {lab.ephemeral[1]}"
    )
    # Listening sockets let their SYNs through (`-m socket`): one lookup per SYN instead of a
    # rule per listener. Safe here: no top1000 port is an ephemeral port, so no connect()
    # can send a SYN to a socket of its own.
    ns.iptables("-N", "psfb-firewalled")
    ns.iptables("-A", "psfb-firewalled", "-p", "tcp", "--syn", "-m", "socket", "-j", "RETURN")
    ns.iptables("-A", "psfb-firewalled", "-p", "tcp", "--syn", "-j", "DROP")
    # Exact pairs rather than `-m socket` here: these hosts are scanned on the ephemeral
    # ports too, and a SYN a socket sent to itself would match its own socket.
    ns.iptables("-N", "psfb-half")
    for host, port in sorted(lab.listeners):
        if host in lab.half_dropped:
            ns.iptables(
                "-A", "psfb-half", "-d", host, "-p", "tcp", "--syn", "--dport", str(port),
                "-j", "RETURN",
            )  # fmt: skip
    ns.iptables(
        "-A", "psfb-half", "-p", "tcp", "--syn", "--dport", "{}:{}".format(*DROPPED_HALF),
        "-j", "DROP",
    )  # fmt: skip


def firewall(ns: NetNS, lab: Lab, *, on: bool) -> None:
    """Jumps from INPUT into each region's chain, so that only that region's SYNs walk its
    rules; off for the growth steps (the whole block is a fleet without firewall then)."""
    ns.iptables("-F", "INPUT")
    if not on:
        return
    for chain, hosts in (("psfb-firewalled", lab.firewalled), ("psfb-half", lab.half_dropped)):
        span = f"{hosts[0]}-{hosts[-1]}"
        ns.iptables("-A", "INPUT", "-m", "iprange", "--dst-range", span, "-j", chain)


def check_lab(lab: Lab) -> None:
    """Inside the namespace: an open pair connects, a closed port refuses, a dropped one
    times out, as each region is meant to."""

    def attempt(host: str, port: int) -> str:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return "open"
        except ConnectionRefusedError:
            return "closed"
        except TimeoutError:
            return "dropped"

    def closed_port(host: str, low: int, high: int) -> int:
        return next(p for p in range(low, high) if (host, p) not in lab.listeners)

    fleet, firewalled, half = lab.fleet[0], lab.firewalled[0], lab.half_dropped[0]
    expectations = [
        (fleet, closed_port(fleet, 1, 1024), "closed"),
        (firewalled, closed_port(firewalled, 1, 1024), "dropped"),
        (half, closed_port(half, 1, 1024), "closed"),
        (half, closed_port(half, DROPPED_HALF[0], MAX_PORT), "dropped"),
    ]
    expectations += [
        (host, port, "open")
        for host, port in sorted(lab.listeners)
        if host in (fleet, firewalled, half)
    ]
    for host, port, expected in expectations:
        if (seen := attempt(host, port)) != expected:
            raise RuntimeError(f"lab check: {host}:{port} is {seen}, expected {expected}")


# --- the daemon ------------------------------------------------------------------------------


def compact_targets(hosts: Sequence[str]) -> list[str]:
    """`hosts` as config targets: CIDR blocks for runs of addresses, plus single addresses
    where a block's hosts() leaves out its network and broadcast addresses."""
    numbers = sorted(int(ipaddress.IPv4Address(h)) for h in hosts)
    targets: list[str] = []
    run_start = previous = numbers[0]
    for number in [*numbers[1:], -1]:
        if number == previous + 1:
            previous = number
            continue
        first, last = ipaddress.IPv4Address(run_start), ipaddress.IPv4Address(previous)
        for network in ipaddress.summarize_address_range(first, last):
            if network.prefixlen >= 31:
                targets.extend(str(a) for a in network)
            else:
                targets += [str(network), str(network.network_address)]
                targets.append(str(network.broadcast_address))
        run_start = previous = number
    return targets


def daemon_config(state: Path, hosts: Sequence[str], port_set: str, identify: bool) -> str:
    assert all(ipaddress.IPv4Address(h) in BLOCK for h in hosts)
    lines = [
        "defaults:",
        f"  ports: {port_set}",
        f"  interval: {INTERVAL}",
        "scan:",
        "  jitter: 0s",
        "fingerprint:",
        f"  enabled: {'true' if identify else 'false'}",
        "storage:",
        f"  path: {state}",
        "targets:",
    ]
    lines += [f"  - {target}" for target in compact_targets(hosts)]
    return "\n".join(lines) + "\n"


class Daemon(DaemonProcess):
    """The daemon started without waiting for readiness: the round is timed from the spawn."""

    def spawn(self) -> int:
        with self.log.open("ab") as log:
            self.proc = self.ns.spawn(
                sys.executable, "-m", "exporter", "--config", str(self.config),
                "--web.listen-address", f"127.0.0.1:{self.port}", "--log.format", "json",
                *self.extra,
                stdout=log, stderr=subprocess.STDOUT, cwd=self.source,
            )  # fmt: skip
        return self.proc.pid  # `ip netns exec` execs the daemon: same process

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 30 s. Signals and /proc rather than Popen.wait: a Ctrl-C
        that lands inside Popen.poll can leave its lock held, and teardown must not hang."""
        proc = self.proc
        if proc is None or proc.returncode is not None:  # not running, or reaped already
            return
        signal_unreaped(proc, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        signal_unreaped(proc, signal.SIGKILL)
        proc.poll()  # reap it


def exited(pid: int) -> bool:
    """Whether the process is gone or a zombie (it can no longer run)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def signal_unreaped(proc: subprocess.Popen[bytes], signum: int) -> None:
    # Only while Popen has not reaped it: until then the pid cannot belong to anyone else.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)


class LabNS(NetNS):
    """NetNS whose teardown does not wait on Popen (see Daemon.stop): the processes it
    started are killed by pid, then the namespace's own teardown kills whatever is left in
    it and deletes it."""

    def __exit__(self, *exc: object) -> None:
        try:
            for proc in self.processes:
                signal_unreaped(proc, signal.SIGKILL)
            self.processes.clear()
        finally:
            super().__exit__(*exc)


class LogWatch:
    """Hosts whose first scan has ended, read from the daemon's JSON log as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.results: dict[str, str] = {}

    def poll(self) -> int:
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                data = log.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if b"scan f" not in line and b"not recorded" not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            host = entry.get("host")
            if entry.get("event") in SCAN_ENDINGS and isinstance(host, str):
                self.results.setdefault(host, str(entry.get("result") or "error"))
        return len(self.results)


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, float]:
    """(status, body, seconds); status 0 when the connection failed. Call inside the ns."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_SECONDS)
    started = time.monotonic()
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, body, time.monotonic() - started
    except (OSError, http.client.HTTPException):
        return 0, b"", time.monotonic() - started
    finally:
        conn.close()


def scanned_hosts(hosts_json: bytes) -> int:
    """Hosts with a last scan, counted on the bytes (no parse: the body may be huge)."""
    return hosts_json.count(b'"last_scan": {')


@dataclass
class Sampler:
    """One client asking for /metrics (gzip) and /api/v1/hosts every few seconds."""

    port: int
    stop: threading.Event
    metrics: list[float] = field(default_factory=list)
    hosts: list[float] = field(default_factory=list)
    failures: int = 0
    finished: int = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT_SECONDS)
        requests: list[tuple[str, dict[str, str], list[float]]] = [
            ("/metrics", {"Accept-Encoding": "gzip"}, self.metrics),
            ("/api/v1/hosts", {}, self.hosts),
        ]
        try:
            while not self.stop.is_set():
                began = time.monotonic()
                for path, headers, latencies in requests:
                    started = time.monotonic()
                    try:
                        conn.request("GET", path, headers=headers)
                        response = conn.getresponse()
                        body = response.read()
                    except (OSError, http.client.HTTPException):
                        self.failures += 1
                        conn.close()
                        continue
                    if response.status != 200:  # 503 while the state loads
                        continue
                    latencies.append(time.monotonic() - started)
                    if path == "/api/v1/hosts":
                        self.finished = scanned_hosts(body)
                self.stop.wait(max(0.0, began + SAMPLE_EVERY_SECONDS - time.monotonic()))
        finally:
            conn.close()


@dataclass
class Exposition:
    plain_bytes: int
    gzip_bytes: int
    series: int


@dataclass
class DaemonRound:
    hosts: int
    finished: int  # hosts whose first scan ended
    done: bool
    spawned: float  # wall clock
    first_start: float | None
    last_finish: float | None
    cpu: float
    peak_rss_mib: float
    results: Counter[str]
    open_pairs: frozenset[Pair]
    sampler: Sampler | None = None
    exposition: Exposition | None = None

    @property
    def seconds(self) -> float | None:
        if not self.done or self.first_start is None or self.last_finish is None:
            return None
        return self.last_finish - self.first_start

    @property
    def startup(self) -> float | None:
        return None if self.first_start is None else self.first_start - self.spawned


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the daemon and its scanner processes)."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                tree.extend(int(child) for child in task.read_text().split())
        index += 1
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU time of the daemon and its scanner processes, living and reaped."""
    ticks = 0
    for member in process_tree(pid):
        # Fields after the parenthesised command name start at field 3 (state); utime,
        # stime, cutime and cstime are fields 14 to 17, in clock ticks, all threads included.
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of the daemon plus that of each of its scanner processes."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


def wait_round(
    daemon: Daemon, watch: LogWatch, sampler: Sampler | None, total: int, deadline: float
) -> tuple[int, bool]:
    """(hosts finished, whether all did) once all did or at the deadline."""
    assert daemon.proc is not None
    count = api_count = 0
    progress_at = time.monotonic()
    while True:
        finished = max(watch.poll(), api_count, sampler.finished if sampler else 0)
        if finished >= total:
            return finished, True
        if daemon.proc.poll() is not None:
            raise RuntimeError(
                f"daemon exited ({daemon.proc.returncode}):\n{daemon.logs()[-4000:]}"
            )
        now = time.monotonic()
        if now >= deadline:
            return finished, False
        if finished > count:
            count, progress_at = finished, now
        elif sampler is None and now - progress_at >= API_FALLBACK_SECONDS:
            status, body, _ = daemon.ns.call(http_get, daemon.port, "/api/v1/hosts")
            if status == 200:
                api_count = scanned_hosts(body)
            progress_at = now
        time.sleep(LOG_POLL_SECONDS)


def measure_exposition(ns: NetNS, port: int) -> Exposition:
    status, plain, _ = ns.call(http_get, port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    _, compressed, _ = ns.call(http_get, port, "/metrics", {"Accept-Encoding": "gzip"})
    series = sum(1 for line in plain.splitlines() if line and not line.startswith(b"#"))
    return Exposition(len(plain), len(compressed), series)


def daemon_round(
    ns: NetNS,
    hosts: Sequence[str],
    port_set: str,
    *,
    identify: bool,
    source: Path | None,
    timeout: float,
    sample: bool = False,
) -> DaemonRound:
    with tempfile.TemporaryDirectory(prefix="psfb") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(daemon_config(Path(tmp) / "state.sqlite", hosts, port_set, identify))
        port = free_port_in(ns)
        daemon = Daemon(ns, config, port, source=source)
        watch = LogWatch(daemon.log)
        sampler: Sampler | None = None
        thread: threading.Thread | None = None
        stop = threading.Event()
        spawned = time.time()
        deadline = time.monotonic() + timeout
        pid = daemon.spawn()
        try:
            if sample:
                sampler = Sampler(port, stop)
                thread = threading.Thread(target=ns.call, args=(sampler.run,), daemon=True)
                thread.start()
            finished, done = wait_round(daemon, watch, sampler, len(hosts), deadline)
            cpu, peak = cpu_seconds(pid), peak_rss_mib(pid)
            stop.set()
            if thread is not None:
                thread.join()
            status, body, _ = ns.call(http_get, port, "/api/v1/hosts")
            if status != 200:
                raise RuntimeError(f"/api/v1/hosts answered {status}")
            starts: list[float] = []
            finishes: list[float] = []
            pairs: set[Pair] = set()
            for host in json.loads(body)["hosts"]:
                last = host.get("last_scan")
                if last is None:
                    continue
                starts.append(float(last["started"]))
                finishes.append(float(last["finished"]))
                pairs.update((host["host"], int(p)) for p in host["open_ports"])
            exposition = measure_exposition(ns, port) if sample else None
        finally:
            stop.set()
            daemon.stop()
    return DaemonRound(
        hosts=len(hosts),
        finished=finished,
        done=done,
        spawned=spawned,
        first_start=min(starts, default=None),
        last_finish=max(finishes, default=None),
        cpu=cpu,
        peak_rss_mib=peak,
        results=Counter(watch.results.values()),
        open_pairs=frozenset(pairs),
        sampler=sampler,
        exposition=exposition,
    )


# --- nmap ------------------------------------------------------------------------------------


def port_ranges(ports: Sequence[int]) -> str:
    """nmap's -p argument for exactly `ports`: "1-3,7,9-11"."""
    parts: list[str] = []
    ordered = sorted(ports)
    start = previous = ordered[0]
    for port in [*ordered[1:], -1]:
        if port == previous + 1:
            previous = port
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = port
    return ",".join(parts)


def parse_nmap_xml(text: str) -> frozenset[Pair]:
    found: set[Pair] = set()
    for host in ET.fromstring(text).iter("host"):
        address = host.find("address")
        if address is None:
            continue
        for port in host.iter("port"):
            state = port.find("state")
            if state is not None and state.get("state") == "open":
                found.add((address.get("addr", ""), int(port.get("portid", "0"))))
    return frozenset(found)


# --- running the tools -----------------------------------------------------------------------


@dataclass
class ToolRun:
    seconds: float | None  # None: did not finish in time
    cpu: float
    open_pairs: frozenset[Pair]
    startup: float | None = None
    note: str = ""
    failed_scans: int = 0


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    hosts: tuple[str, ...]
    port_set: str

    @property
    def ports(self) -> tuple[int, ...]:
        return resolve_ports(self.port_set)


def workloads(lab: Lab) -> dict[str, Workload]:
    def hosts(group: Sequence[str], kind: str = "") -> str:
        return f"{len(group)} {kind}host{'' if len(group) == 1 else 's'}"

    return {
        "1": Workload("1", f"{hosts(lab.fleet)} x top100", lab.fleet, "top100"),
        "2": Workload("2", f"{hosts(lab.fleet)} x top1000", lab.fleet, "top1000"),
        "3": Workload(
            "3", f"{hosts(lab.firewalled, 'firewalled ')} x top1000", lab.firewalled, "top1000"
        ),
        "4": Workload(
            "4", f"{hosts(lab.half_dropped)} x 1-65535 half dropped", lab.half_dropped, "all"
        ),
    }


def run_ours(ns: NetNS, work: Workload, args: argparse.Namespace) -> ToolRun:
    result = daemon_round(
        ns,
        work.hosts,
        work.port_set,
        identify=args.identify,
        source=args.source,
        timeout=args.round_timeout,
    )
    outcomes = ", ".join(f"{n} {r}" for r, n in sorted(result.results.items()))
    note = f"{result.finished}/{result.hosts} hosts ({outcomes})"
    if not result.done:
        note = f"not done in {args.round_timeout:.0f} s: {note}"
    failed = result.hosts - result.results.get("success", 0) - result.results.get("unreachable", 0)
    return ToolRun(result.seconds, result.cpu, result.open_pairs, result.startup, note, failed)


def run_nmap(
    ns: NetNS, mode: Sequence[str], work: Workload, targets: Path, timeout: float
) -> ToolRun:
    cmd = ["nmap", *mode, "-T4", "-n", "-Pn", "-p", port_ranges(work.ports)]
    cmd += ["-iL", str(targets), "-oX", "-"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        proc = ns.run(*cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ToolRun(None, 0.0, frozenset(), note=f"not done in {timeout:.0f} s")
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    found = parse_nmap_xml(proc.stdout)
    return ToolRun(seconds, cpu, found, note=f"{len(found)} open")


def nmap_modes(args: argparse.Namespace) -> list[str]:
    """nmap's scan types to run beside ours: --nmap's, and -sV with --identify."""
    modes = [f"-{mode.strip()}" for mode in args.nmap.split(",") if mode.strip()]
    return modes + (["-sV"] if args.identify and "-sV" not in modes else [])


def median(values: Sequence[float | None]) -> float | None:
    done = [v for v in values if v is not None]
    return statistics.median(done) if done else None


def show_seconds(values: Sequence[float | None]) -> str:
    value = median(values)
    if value is None:
        return "n/f"
    done = sum(v is not None for v in values)
    return f"{value:.2f}" if done == len(values) else f"{value:.2f} ({done}/{len(values)})"


def describe_difference(found: frozenset[Pair], expected: frozenset[Pair]) -> str:
    def listed(pairs: set[Pair]) -> str:
        shown = ", ".join(f"{h}:{p}" for h, p in sorted(pairs)[:8])
        return shown + (f" and {len(pairs) - 8} more" if len(pairs) > 8 else "")

    missing, extra = set(expected - found), set(found - expected)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {listed(missing)}")
    if extra:
        parts.append(f"extra {len(extra)}: {listed(extra)}")
    return "; ".join(parts)


def bench_workload(
    ns: NetNS, lab: Lab, work: Workload, args: argparse.Namespace, tmp: Path
) -> tuple[list[str], list[str]]:
    """(table cells, notes) for one workload after `--runs` interleaved runs."""
    targets = tmp / f"targets-{work.key}.txt"
    targets.write_text("".join(f"{h}\n" for h in work.hosts))
    modes = {f"nmap {mode}": [mode] for mode in nmap_modes(args)}
    tools: list[tuple[str, Callable[[], ToolRun]]] = [
        ("ours", functools.partial(run_ours, ns, work, args))
    ]
    for name, mode in modes.items():
        nmap = functools.partial(run_nmap, ns, mode, work, targets, args.round_timeout)
        tools.append((name, nmap))
    runs: dict[str, list[ToolRun]] = {name: [] for name, _ in tools}
    for index in range(args.runs):
        shift = index % len(tools)
        for name, tool in tools[shift:] + tools[:shift]:
            run = tool()
            runs[name].append(run)
            took = "n/f" if run.seconds is None else f"{run.seconds:.2f} s"
            print(
                f"  [{work.key}] run {index + 1} {name}: {took}, CPU {run.cpu:.2f} s, {run.note}",
                file=sys.stderr,
                flush=True,
            )
    expected = frozenset(pair for pair in lab.listeners if pair[0] in set(work.hosts))
    notes: list[str] = []
    for name, tool_runs in runs.items():
        for index, run in enumerate(tool_runs):
            if run.failed_scans:
                notes.append(
                    f"workload {work.key}, {name}, run {index + 1}: {run.failed_scans} hosts"
                    f" without a recorded scan ({run.note}; see the daemon's log)"
                )
            if run.seconds is None:
                notes.append(f"workload {work.key}, {name}, run {index + 1}: {run.note}")
            elif run.open_pairs != expected:
                difference = describe_difference(run.open_pairs, expected)
                notes.append(f"workload {work.key}, {name}, run {index + 1}: {difference}")
    identical = not notes and all(r.seconds is not None for rs in runs.values() for r in rs)
    ours = runs["ours"]
    cells = [
        work.key,
        work.title,
        show_seconds([r.seconds for r in ours]),
        show_seconds([r.startup for r in ours]),
        f"{statistics.median(r.cpu for r in ours):.1f}",
    ]
    ours_median = median([r.seconds for r in ours])
    for name in modes:
        cells.append(show_seconds([r.seconds for r in runs[name]]))
        cells.append(f"{statistics.median(r.cpu for r in runs[name]):.1f}")
    for name in modes:
        theirs = median([r.seconds for r in runs[name]])
        ratio = "n/a" if ours_median is None or not theirs else f"{ours_median / theirs:.2f}"
        cells.append(ratio)
    cells.append(f"yes ({len(expected)} open)" if identical else "NO (see below)")
    return cells, notes


def table_header(columns: Sequence[str]) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def latency_cell(latencies: Sequence[float]) -> str:
    if not latencies:
        return "none"
    ordered = sorted(latencies)
    p95 = ordered[max(0, round(len(ordered) * 0.95) - 1)]
    ms = [statistics.median(ordered) * 1000, p95 * 1000, ordered[-1] * 1000]
    return "{:.0f} / {:.0f} / {:.0f} ({})".format(*ms, len(ordered))


def growth_cells(count: int, result: DaemonRound, timeout: float) -> list[str]:
    seconds = result.seconds
    startup = "n/a" if result.startup is None else f"{result.startup:.2f}"
    sampler = result.sampler
    assert sampler is not None
    exposition = result.exposition
    shown = (
        "n/a"
        if exposition is None
        else f"{exposition.plain_bytes / 1024:.0f} KiB ({exposition.gzip_bytes / 1024:.0f} KiB)"
    )
    return [
        str(count),
        f"{seconds:.2f}"
        if seconds is not None
        else f"not finished: {result.finished}/{count} hosts in {timeout:.0f} s",
        startup,
        f"{result.cpu / max(1, result.finished) * 1000:.2f}",
        f"{result.peak_rss_mib:.0f}",
        latency_cell(sampler.metrics),
        latency_cell(sampler.hosts),
        shown,
        "n/a" if exposition is None else str(exposition.series),
    ]


def machine_facts(source: Path | None) -> list[str]:
    nmap = subprocess.run(["nmap", "--version"], capture_output=True, text=True, check=False)
    version = subprocess.run(
        [sys.executable, "-m", "exporter", "--version"],
        capture_output=True,
        text=True,
        cwd=source,
        check=False,
    )
    return [
        f"- cores (nproc): {os.cpu_count()}",
        f"- kernel: {platform.release()}",
        f"- nmap: {(nmap.stdout.splitlines() or ['?'])[0]}",
        f"- python: {platform.python_version()}",
        f"- daemon: {version.stdout.strip() or '?'}"
        + (f" (from {source})" if source else " (this tree)"),
    ]


def parse_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip() and int(part) > 0]


def interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM tears the lab down as Ctrl-C does; a second signal must not cut the teardown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="1,2,3,4", help="comma list of rows (1-4)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--growth", default=DEFAULT_GROWTH, help="target counts; 0 to skip")
    parser.add_argument(
        "--nmap", default="sT,sS", help="nmap scan types to compare with (sT, sS; '' for none)"
    )
    parser.add_argument("--identify", action="store_true", help="fingerprint, and time nmap -sV")
    parser.add_argument("--source", type=Path, help="directory holding another `exporter`")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the workload hosts")
    parser.add_argument("--round-timeout", type=float, default=1800.0, help="seconds")
    parser.add_argument("--serve-listeners", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_listeners is not None:
        return serve_listeners(args.serve_listeners)
    if reason := missing_root_reason():
        print(f"bench: {reason}", file=sys.stderr)
        return 2
    if subprocess.run(["which", "nmap"], capture_output=True, check=False).returncode:
        print("bench: needs nmap (Debian package nmap)", file=sys.stderr)
        return 2
    chosen = [key for key in args.workloads.split(",") if key.strip()]
    growth = parse_list(args.growth)
    if not 0 < args.scale <= 1 or args.runs < 1:
        parser.error("--scale must be in (0, 1] and --runs at least 1")
    if any(key not in "1234" or len(key) != 1 for key in chosen):
        parser.error("--workloads takes a comma list of 1, 2, 3 and 4")
    if any(count > BLOCK.num_addresses for count in growth):
        parser.error(f"--growth counts go up to {BLOCK.num_addresses}")
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    lab = build_lab(args.scale)
    print("# Fleet scan: portscan-exporter against nmap\n")
    print("\n".join(machine_facts(args.source)))
    print(
        f"- lab: {len(lab.fleet)} fleet hosts, {len(lab.firewalled)} firewalled,"
        f" {len(lab.half_dropped)} half dropped; {len(lab.listeners)} listeners;"
        " ephemeral ports {}-{}".format(*lab.ephemeral),
        flush=True,
    )
    all_notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="psfb") as tmp, LabNS("psfb") as ns:
        make_namespace(ns, lab)
        with listener_process(ns, lab, Path(tmp)):
            firewall(ns, lab, on=True)
            ns.call(check_lab, lab)
            if chosen:
                modes = [f"nmap {mode}" for mode in nmap_modes(args)]
                columns = ["#", "workload", "ours s", "start-up s", "ours CPU s"]
                for mode in modes:
                    columns += [f"{mode} s", "CPU s"]
                columns += [f"ours/{mode.removeprefix('nmap ')}" for mode in modes]
                columns.append("open sets identical")
                fingerprint = "on" if args.identify else "off"
                print(
                    f"\n## Workloads ({args.runs} interleaved runs, medians;"
                    f" fingerprint {fingerprint})\n"
                )
                print(table_header(columns), flush=True)
                table = workloads(lab)
                for key in chosen:
                    cells, notes = bench_workload(ns, lab, table[key], args, Path(tmp))
                    all_notes += notes
                    print(table_row(cells), flush=True)
                print(
                    "\nours: one round, first scan start to last host done (start-up: process"
                    " start to first scan); CPU: process total at the end of the round."
                    "\nnmap: whole process, -T4 -n -Pn -p <the same ports>."
                )
                for note in all_notes:
                    print(f"- {note}")
            if growth:
                firewall(ns, lab, on=False)
                print("\n## Cost growth (targets x top100, one round, fingerprint off)\n")
                print(
                    table_header(
                        [
                            "targets",
                            "round s",
                            "start-up s",
                            "CPU s / 1k scans",
                            "peak RSS MiB",
                            "GET /metrics ms p50 / p95 / max (n)",
                            "GET /api/v1/hosts ms p50 / p95 / max (n)",
                            "exposition (gzip)",
                            "series",
                        ]
                    ),
                    flush=True,
                )
                for count in growth:
                    result = daemon_round(
                        ns,
                        block_prefix(count),
                        "top100",
                        identify=False,
                        source=args.source,
                        timeout=args.round_timeout,
                        sample=True,
                    )
                    print(table_row(growth_cells(count, result, args.round_timeout)), flush=True)
    return 1 if all_notes else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; the lab is torn down", file=sys.stderr)
        raise SystemExit(130) from None
