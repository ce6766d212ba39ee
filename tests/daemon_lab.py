"""The real daemon as a subprocess in a namespace, scraped over HTTP like Prometheus does."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.lab import NetNS

Labels = dict[str, str]
# Never through a proxy from the environment: the daemon is on this namespace's loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Sample:
    name: str
    labels: Labels
    value: float


def parse_metrics(text: str) -> list[Sample]:
    return [
        Sample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = parse_metrics(text)

    def value(self, name: str, **labels: str) -> float | None:
        for sample in self.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
        return None

    def port(self, name: str, host: str, port: int, **labels: str) -> float | None:
        return self.value(name, host=host, port=str(port), **labels)

    def scans(self, host: str) -> int:
        return int(
            sum(
                s.value
                for s in self.samples
                if s.name == "portscan_scans_total" and s.labels.get("host") == host
            )
        )


def free_port_in(ns: NetNS) -> int:
    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    return ns.call(pick)


class DaemonProcess:
    """`python -m exporter --config FILE` inside `ns`, listening on 127.0.0.1:port there.

    `source` is a directory holding another `exporter` package to run instead of this tree's
    (an earlier release, for upgrade tests).
    """

    def __init__(
        self, ns: NetNS, config: Path, port: int, *extra: str, source: Path | None = None
    ) -> None:
        self.ns, self.config, self.port, self.extra = ns, config, port, extra
        self.source = source
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.parent / "daemon.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = self.ns.spawn(
                sys.executable, "-m", "exporter", "--config", str(self.config),
                "--web.listen-address", f"127.0.0.1:{self.port}", "--log.format", "json",
                *self.extra,
                stdout=log, stderr=subprocess.STDOUT, cwd=self.source,
            )  # fmt: skip
        self.wait_until(lambda: self.get("/-/ready")[0] == 200, timeout=30, what="ready")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"

        def call() -> tuple[int, bytes]:
            req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
            try:
                with _OPENER.open(req, timeout=10) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as err:
                return err.code, err.read()
            except OSError:
                return 0, b""

        return self.ns.call(call)

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def scrape(self) -> Scrape:
        status, body = self.get("/metrics")
        assert status == 200, body
        return Scrape(body.decode())

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def wait_until(
        self, check: Callable[[], bool], *, timeout: float = 20, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}): {self.logs()}")
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; daemon log:\n{self.logs()[-4000:]}")

    def wait_for_scan(self, host: str, after: int, timeout: float = 20) -> Scrape:
        """The first scrape whose scan count of `host` exceeds `after`."""
        box: list[Scrape] = []

        def check() -> bool:
            scrape = self.scrape()
            if scrape.scans(host) > after:
                box.append(scrape)
                return True
            return False

        self.wait_until(check, timeout=timeout, what=f"scan #{after + 1} of {host}")
        return box[0]

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
