"""Real Prometheus and Alertmanager processes (Debian packages) for tests, and a webhook receiver.

Each server runs from a temporary directory on a free port of 127.0.0.1, either on this
machine's loopback or inside a test's network namespace (`ns`): then it is spawned with
`ip netns exec` and every HTTP request to it is made from a thread that joined the namespace.
The servers are killed when their context exits, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.lab import NetNS

T = TypeVar("T")
# Never through a proxy from the environment: every server here is on a private loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Debian installs Alertmanager as prometheus-alertmanager; upstream tarballs as alertmanager.
ALERTMANAGER_NAMES = ("prometheus-alertmanager", "alertmanager")


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def alertmanager_binary() -> str | None:
    return next(filter(None, map(shutil.which, ALERTMANAGER_NAMES)), None)


def missing_binaries_reason(*, alertmanager: bool = False) -> str | None:
    if prometheus_binary() is None:
        return "prometheus not installed (Debian package prometheus)"
    if alertmanager and alertmanager_binary() is None:
        return "alertmanager not installed (Debian package prometheus-alertmanager)"
    return None


def wait_for(
    what: str,
    check: Callable[[], bool],
    seconds: float = 30,
    *,
    details: Callable[[], str] | None = None,
    interval: float = 0.2,
) -> None:
    """Poll `check` until it holds; on timeout fail naming `what` and, if given, `details()`."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {seconds:g}s waiting for {what}{extra}")
        time.sleep(interval)


def _in(ns: NetNS | None, fn: Callable[[], T]) -> T:
    return fn() if ns is None else ns.call(fn)


def free_port(ns: NetNS | None = None) -> int:
    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    return _in(ns, pick)


@dataclass
class HTTPServerAPI:
    """JSON over HTTP to one server at `base`, from inside `ns` when given."""

    base: str
    ns: NetNS | None = None

    def fetch(self, path: str, **params: str) -> tuple[int, bytes]:
        """(status, body); status 0 when nothing answered."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"{self.base}{path}{query}"

        def call() -> tuple[int, bytes]:
            try:
                with _OPENER.open(url, timeout=10) as response:
                    return int(response.status), bytes(response.read())
            except urllib.error.HTTPError as err:
                return err.code, err.read()
            except OSError:
                return 0, b""

        return _in(self.ns, call)

    def json(self, path: str, **params: str) -> Any:
        status, body = self.fetch(path, **params)
        if status != 200:
            raise AssertionError(f"GET {path} {params}: HTTP {status}: {body.decode()[:2000]}")
        return json.loads(body)

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def ready(self) -> bool:
        return self.fetch("/-/ready")[0] == 200


@dataclass
class Prom(HTTPServerAPI):
    """The Prometheus HTTP API."""

    def get(self, path: str, **params: str) -> Any:
        doc = self.json(path, **params)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; fails with Prometheus' message when it does not parse or run."""
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] in {"vector", "scalar"}, expr
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, seconds: float, step: float = 2.0) -> list[dict[str, Any]]:
        end = time.time()
        data = self.get(
            "/api/v1/query_range",
            query=expr,
            start=f"{end - seconds:.3f}",
            end=f"{end:.3f}",
            step=f"{step:g}",
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts of the rule manager, pending and firing."""
        alerts: list[dict[str, Any]] = self.get("/api/v1/alerts")["alerts"]
        return alerts


@dataclass
class Alertmanager(HTTPServerAPI):
    """The Alertmanager v2 API."""

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert it holds, inhibited and silenced ones included."""
        alerts: list[dict[str, Any]] = self.json("/api/v2/alerts")
        return alerts


@contextlib.contextmanager
def _server(
    binary: str,
    args: Callable[[int], Sequence[str]],
    log: Path,
    ns: NetNS | None,
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """`binary *args(port)` listening on 127.0.0.1:port, ready; killed on exit."""
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _attempt in range(3):  # the free port may be taken between probe and bind
            port = free_port(ns)
            argv = [binary, *args(port)]
            with log.open("ab") as out:
                if ns is None:
                    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
                else:
                    proc = ns.spawn(*argv, stdout=out, stderr=subprocess.STDOUT)
            api = HTTPServerAPI(f"http://127.0.0.1:{port}", ns)

            def started(proc: subprocess.Popen[bytes] = proc, api: HTTPServerAPI = api) -> bool:
                return proc.poll() is not None or api.ready()

            wait_for(
                f"{os.path.basename(binary)} to be ready",
                started,
                seconds=30,
                details=lambda: log.read_text(errors="replace")[-3000:],
            )
            if proc.poll() is None:
                break
        assert proc is not None and proc.poll() is None, log.read_text(errors="replace")
        yield port, proc
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@contextlib.contextmanager
def run_prometheus(
    workdir: Path,
    config: dict[str, Any],
    *,
    ns: NetNS | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[Prom]:
    """A Prometheus with `config` (a prometheus.yml document), its data in `workdir`."""
    binary = prometheus_binary()
    assert binary is not None, missing_binaries_reason()
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def args(port: int) -> list[str]:
        return [
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            *extra_args,
        ]

    with _server(binary, args, workdir / "prometheus.log", ns) as (port, _proc):
        yield Prom(f"http://127.0.0.1:{port}", ns)


@contextlib.contextmanager
def run_alertmanager(
    workdir: Path, config: dict[str, Any], *, ns: NetNS | None = None
) -> Iterator[Alertmanager]:
    """A single Alertmanager (no cluster: nothing to gossip with or wait for) with `config`."""
    binary = alertmanager_binary()
    assert binary is not None, missing_binaries_reason(alertmanager=True)
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def args(port: int) -> list[str]:
        return [
            f"--config.file={config_file}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ]

    with _server(binary, args, workdir / "alertmanager.log", ns) as (port, _proc):
        yield Alertmanager(f"http://127.0.0.1:{port}", ns)


@dataclass(frozen=True)
class Notification:
    """One webhook call from Alertmanager: when it arrived, on which path, and its payload."""

    received: float  # unix seconds
    path: str
    payload: dict[str, Any]

    @property
    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.payload["alerts"]
        return alerts


@dataclass
class WebhookReceiver:
    """Records Alertmanager's webhook notifications (POSTed JSON) on 127.0.0.1:port."""

    port: int
    notifications: list[Notification] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[Notification]:
        with self._lock:
            return list(self.notifications)

    def record(self, path: str, body: bytes) -> None:
        note = Notification(time.time(), path, json.loads(body))
        with self._lock:
            self.notifications.append(note)

    def describe(self) -> str:
        lines = [f"webhook notifications received ({len(self.snapshot())}):"]
        for note in self.snapshot():
            alerts = ", ".join(
                f"{a['status']} {a['labels'].get('alertname')}"
                f"{{host={a['labels'].get('host')},port={a['labels'].get('port')}}}"
                f" startsAt={a['startsAt']} endsAt={a['endsAt']}"
                for a in note.alerts
            )
            lines.append(
                f"  {note.received:.3f} {note.path} receiver={note.payload.get('receiver')}"
                f" status={note.payload.get('status')} group={note.payload.get('groupLabels')}:"
                f" {alerts}"
            )
        return "\n".join(lines)


@contextlib.contextmanager
def webhook_receiver(ns: NetNS | None = None) -> Iterator[WebhookReceiver]:
    """A receiver listening in `ns` (the socket keeps its namespace; any thread may serve it)."""

    def make() -> _WebhookServer:
        return _WebhookServer(("127.0.0.1", 0), _WebhookHandler)

    server = _in(ns, make)
    receiver = WebhookReceiver(int(server.server_address[1]))
    server.receiver = receiver
    thread = threading.Thread(target=server.serve_forever, name="webhook", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _WebhookServer(ThreadingHTTPServer):
    daemon_threads = True
    receiver: WebhookReceiver


class _WebhookHandler(BaseHTTPRequestHandler):
    server: _WebhookServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        try:
            self.server.receiver.record(self.path, body)
        except ValueError:
            self.send_response(400)
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass
