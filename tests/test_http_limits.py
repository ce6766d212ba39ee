"""The HTTP server's bounds, with real sockets on 127.0.0.1: slow request headers are cut off,
connections past the cap are refused and service resumes after, idle keep-alive connections
are closed; and the probe budget leaves the HTTP side and the rest of the process their
descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web

from exporter.scanner.limits import (
    HTTP_CONNECTIONS,
    HTTP_REFUSALS,
    RESERVED_DESCRIPTORS,
    probes_that_fit,
)
from exporter.scanner.processes import SCANNER_RESERVED_DESCRIPTORS
from exporter.web.app import build_app
from exporter.web.connections import (
    HEADER_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    MAX_CONNECTIONS,
    REFUSAL_LINGER_SECONDS,
    REFUSAL_SLOTS,
    BoundedServer,
)
from exporter.web.listen import start_server
from tests.test_http import LabControl, exposition, fetch, lab_control, populated_lab

HEADER_TIMEOUT = 0.5
SLOW_CLIENTS = 500
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def control(tmp_path: Path) -> Iterator[LabControl]:
    with populated_lab(tmp_path) as lab:
        yield lab_control(lab, tmp_path)


@contextlib.asynccontextmanager
async def serving(
    control: LabControl,
    *,
    header_timeout: float = HEADER_TIMEOUT_SECONDS,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    max_connections: int = MAX_CONNECTIONS,
) -> AsyncIterator[tuple[str, BoundedServer]]:
    """The real app on 127.0.0.1 with the given bounds; yields its URL and its server."""
    app = build_app(control, exposition(control, None))
    runner = await start_server(
        app,
        "127.0.0.1:0",
        None,
        header_timeout=header_timeout,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
    )
    try:
        server = cast(BoundedServer, runner.server)
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", server
    finally:
        await runner.cleanup()


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(url.rsplit(":", 1)[1])
    return await asyncio.open_connection("127.0.0.1", port)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


async def wait_for(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()


@pytest.fixture
def descriptors_for_slow_clients() -> None:
    # Each slow client costs two descriptors here (both ends are in this process).
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2 * SLOW_CLIENTS + 200:
        pytest.skip(f"open-file limit {soft} too low for {SLOW_CLIENTS} test connections")


@pytest.mark.usefixtures("descriptors_for_slow_clients")
async def test_slow_headers_are_cut_off_while_scrapes_answer(control: LabControl) -> None:
    async with serving(
        control, header_timeout=HEADER_TIMEOUT, max_connections=SLOW_CLIENTS + 50
    ) as (url, server):
        writers: list[asyncio.StreamWriter] = []
        try:
            readers = []
            started = time.monotonic()
            for _ in range(SLOW_CLIENTS):
                reader, writer = await connect(url)
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0")  # half a line, then nothing
                readers.append(reader)
                writers.append(writer)
            await wait_for(lambda: server.open_connections == SLOW_CLIENTS, 5)
            scrape = await fetch(url + "/metrics")  # while all of them hang
            assert scrape.status == 200 and b"portscan_" in scrape.body
            answers = await asyncio.wait_for(
                asyncio.gather(*(read_until_closed(r) for r in readers)),
                timeout=HEADER_TIMEOUT + 5,
            )
            elapsed = time.monotonic() - started
        finally:
            close_all(writers)
        assert answers == [b""] * SLOW_CLIENTS  # closed without an answer
        assert server.timed_out == SLOW_CLIENTS and server.refused == 0
        assert HEADER_TIMEOUT <= elapsed < HEADER_TIMEOUT + 5
        await wait_for(lambda: server.open_connections == 0, 5)


async def test_headers_that_arrive_in_time_are_served(control: LabControl) -> None:
    async with serving(control, header_timeout=HEADER_TIMEOUT) as (url, server):
        reader, writer = await connect(url)
        try:
            for piece in (b"GET /-/healthy HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n"):
                writer.write(piece)
                await asyncio.sleep(HEADER_TIMEOUT / 5)
            writer.write(b"\r\n")
            answer = await asyncio.wait_for(read_until_closed(reader), 5)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert server.timed_out == 0


async def test_a_request_in_progress_outlives_the_header_timeout(control: LabControl) -> None:
    # The timer covers the headers only: a handler slower than it is not interrupted.
    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(HEADER_TIMEOUT * 2)
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/slow", slow)
    runner = await start_server(app, "127.0.0.1:0", None, header_timeout=HEADER_TIMEOUT)
    try:
        answer = await fetch(f"http://127.0.0.1:{runner.addresses[0][1]}/slow")
    finally:
        await runner.cleanup()
    assert (answer.status, answer.text) == (200, "done")


async def test_connections_past_the_cap_are_refused_and_service_resumes(
    control: LabControl,
) -> None:
    cap = 20
    failures: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: failures.append(context))
    async with serving(control, max_connections=cap) as (url, server):
        writers: list[asyncio.StreamWriter] = []
        try:
            for _ in range(cap):
                writers.append((await connect(url))[1])
            await wait_for(lambda: server.open_connections == cap, 5)
            # A client that says nothing and clients that send a request at once (whose
            # unread input must not turn the answer into a reset) all read the refusal.
            silent_reader, silent_writer = await connect(url)
            writers.append(silent_writer)
            talkers = [await connect(url) for _ in range(5)]
            for _, writer in talkers:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                writers.append(writer)
            refused_raw = await asyncio.wait_for(
                asyncio.gather(
                    *(read_until_closed(r) for r in [silent_reader] + [r for r, _ in talkers])
                ),
                5,
            )
            refused_scrape = await fetch(url + "/metrics")
        finally:
            close_all(writers)
        for answer in refused_raw:
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert answer.endswith(b"\r\n\r\ntoo many connections\n")
        assert (refused_scrape.status, refused_scrape.text) == (503, "too many connections\n")
        assert server.refused == 7
        await wait_for(lambda: server.open_connections == 0, 5)
        scrapes = await asyncio.gather(*(fetch(url + "/metrics") for _ in range(cap)))
        assert [s.status for s in scrapes] == [200] * cap
        assert server.refused == 7
    gc.collect()  # a task that failed unseen is reported when it is collected
    assert failures == []


async def test_refusals_past_their_slots_are_closed_at_once(control: LabControl) -> None:
    # Refused clients that keep their end open hold a refusal slot for a moment; once all
    # are taken, further ones are closed at once, so descriptors stay bounded.
    async with serving(control, max_connections=1) as (url, server):
        writers: list[asyncio.StreamWriter] = []
        try:
            writers.append((await connect(url))[1])
            await wait_for(lambda: server.open_connections == 1, 5)
            lingering = [await connect(url) for _ in range(REFUSAL_SLOTS)]
            writers.extend(w for _, w in lingering)
            answers = await asyncio.wait_for(
                asyncio.gather(*(read_until_closed(r) for r, _ in lingering)), 5
            )
            assert server.lingering_refusals == REFUSAL_SLOTS
            late_reader, late_writer = await connect(url)
            writers.append(late_writer)
            await asyncio.wait_for(read_until_closed(late_reader), 5)
            await wait_for(lambda: server.refused == REFUSAL_SLOTS + 1, 5)
            assert server.lingering_refusals == REFUSAL_SLOTS
            started = time.monotonic()
            await wait_for(lambda: server.lingering_refusals == 0, REFUSAL_LINGER_SECONDS + 5)
            released_after = time.monotonic() - started
        finally:
            close_all(writers)
        assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers)
        assert released_after <= REFUSAL_LINGER_SECONDS + 0.5
        assert server.open_connections == 1


async def test_idle_keep_alive_connections_are_closed(control: LabControl) -> None:
    idle = 0.5
    async with serving(control, idle_timeout=idle) as (url, server):
        reader, writer = await connect(url)
        try:
            writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), 5)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            answered = time.monotonic()
            await asyncio.wait_for(read_until_closed(reader), idle + 5)
            held = time.monotonic() - answered
        finally:
            writer.close()
        assert status == b"HTTP/1.1 200 OK\r\n"
        assert idle * 0.8 <= held < idle + 5
        await wait_for(lambda: server.open_connections == 0, 5)


# --- the descriptor budget ---------------------------------------------------------------------


def test_probes_get_what_the_others_leave() -> None:
    assert probes_that_fit(5000, 1024, 600) == 424
    assert probes_that_fit(100, 1024, 600) == 100
    assert probes_that_fit(5000, 500, 600) == 1  # never zero: a scan with no socket never ends


PROBE_LIMIT_UNDER_RLIMIT = """
import json, resource, sys
from types import SimpleNamespace
from exporter.daemon.pipeline import _probe_limit

limit, max_probes, concurrency, processes = map(int, sys.argv[1:])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
config = SimpleNamespace(
    scan=SimpleNamespace(max_probes=max_probes),
    fingerprint=SimpleNamespace(enabled=True, concurrency=concurrency),
)
print(json.dumps({"allowed": _probe_limit(config, processes)}))
"""


def probe_limit_under(
    limit: int, max_probes: int, concurrency: int, processes: int = 1
) -> tuple[int, str]:
    """The daemon's probe budget in a process whose open-file limit is `limit` (soft and
    hard, so it cannot be raised) with `processes` scanner processes; returns it and what
    the process logged."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE_LIMIT_UNDER_RLIMIT,
            str(limit),
            str(max_probes),
            str(concurrency),
            str(processes),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    )
    *logged, last = done.stdout.strip().splitlines()
    return json.loads(last)["allowed"], "\n".join(logged) + done.stderr


def test_the_probe_budget_leaves_the_http_side_and_the_process_their_descriptors() -> None:
    allowed, logged = probe_limit_under(2048, 5000, 64)
    # probes + HTTP connections + identification + reserve <= RLIMIT_NOFILE
    assert allowed == 2048 - HTTP_CONNECTIONS - HTTP_REFUSALS - RESERVED_DESCRIPTORS - 64
    assert "open-file limit too low for scan.max_probes, lowering it" in logged
    assert "5000" in logged and str(allowed) in logged


def test_scanner_processes_each_get_their_part_of_the_probe_budget() -> None:
    # Each scanner process has a descriptor table of its own under the same limit, and needs
    # only its part of the window and a few descriptors besides.
    allowed, logged = probe_limit_under(2048, 5000, 64, processes=2)
    assert allowed == 2 * (2048 - SCANNER_RESERVED_DESCRIPTORS)
    assert "open-file limit too low for scan.max_probes, lowering it" in logged
    allowed, logged = probe_limit_under(2048, 3000, 64, processes=2)
    assert allowed == 3000
    assert "lowering" not in logged


def test_a_probe_budget_that_fits_is_kept() -> None:
    allowed, logged = probe_limit_under(2048, 1000, 64)
    assert allowed == 1000
    assert "lowering" not in logged
