"""When hosts are scanned: first scans, missed scans after downtime, jitter, confirmations."""

from __future__ import annotations

import random

import pytest

from exporter.config import HostSpec, ScanSettings, parse_config
from exporter.daemon.schedule import FIRST_SCAN_SPREAD_SECONDS, DueTimes, Planner

HOUR = 3600.0
NOW = 1_800_000_000.0


def spec(interval: float = HOUR, confirm_after: float = 300.0) -> HostSpec:
    config = parse_config(
        f"defaults:\n  interval: {interval}s\n  confirm_after: {confirm_after}s\n"
        "targets:\n  - 192.0.2.1\n",
        "c.yaml",
    )
    return config.hosts[0]


def planner(fraction: float | None = 0.1, seconds: float | None = None) -> Planner:
    settings = ScanSettings(
        max_concurrent_hosts=4,
        max_probes=4096,
        processes=1,
        jitter_fraction=fraction,
        jitter_seconds=seconds,
        max_hosts=65536,
    )
    return Planner(settings, random.Random(7))


@pytest.mark.parametrize(
    ("last_finished", "earliest", "latest"),
    [
        # Never scanned: soon, spread over at most FIRST_SCAN_SPREAD_SECONDS.
        (None, NOW, NOW + FIRST_SCAN_SPREAD_SECONDS),
        # Scanned 10 minutes ago with a 1 h interval: due 50 minutes from now.
        (NOW - 600, NOW + HOUR - 600, NOW + HOUR - 600),
        # Down for 3 days: one scan soon, not 72 catch-up scans.
        (NOW - 3 * 86400, NOW, NOW + FIRST_SCAN_SPREAD_SECONDS),
    ],
)
def test_first_due(last_finished: float | None, earliest: float, latest: float) -> None:
    p = planner()
    for _ in range(50):
        due = p.first_due(spec(), last_finished, NOW)
        assert earliest <= due <= latest


@pytest.mark.parametrize(
    ("last_finished", "earliest", "latest"),
    [
        # A change seen 1 minute before a restart: confirmed 5 minutes after that sighting.
        (NOW - 60, NOW + 240, NOW + 240),
        # Seen long before the restart: confirmed soon, not an interval later.
        (NOW - 3600, NOW, NOW + FIRST_SCAN_SPREAD_SECONDS),
    ],
)
def test_first_due_with_a_pending_change_keeps_the_confirmation_early(
    last_finished: float, earliest: float, latest: float
) -> None:
    p = planner()
    for _ in range(50):
        due = p.first_due(spec(), last_finished, NOW, confirming=True)
        assert earliest <= due <= latest


def test_next_due_is_interval_with_jitter_and_confirmation_is_early() -> None:
    p = planner(fraction=0.1)
    dues = [p.next_due(spec(), NOW, confirming=False) - NOW for _ in range(200)]
    assert all(HOUR - 180 <= d <= HOUR + 180 for d in dues)  # 10% of 1 h, centred
    assert max(dues) - min(dues) > 200  # hosts that started together drift apart
    assert p.next_due(spec(), NOW, confirming=True) == NOW + 300


@pytest.mark.parametrize(
    ("fraction", "seconds", "interval", "span"),
    [
        (0.1, None, HOUR, 360.0),
        (None, 30.0, HOUR, 30.0),
        (None, 0.0, HOUR, 0.0),
        (None, 7200.0, HOUR, HOUR / 2),  # never more than half the interval
    ],
)
def test_jitter_span(
    fraction: float | None, seconds: float | None, interval: float, span: float
) -> None:
    assert planner(fraction, seconds).jitter_span(spec(interval)) == pytest.approx(span)


def test_no_jitter_is_exact() -> None:
    p = planner(fraction=None, seconds=0.0)
    assert p.next_due(spec(), NOW, confirming=False) == NOW + HOUR
    assert p.first_due(spec(), None, NOW) == NOW


# --- which hosts start, and when the loop wakes -------------------------------------------------

# Steps on a DueTimes with 2 slots: ("set", host, due), ("finish", host), ("replace", {..}),
# ("start", now, hosts started), ("wake", expected next_wake).
DUE_TIMES_CASES = {
    "longest overdue first, no more than the free slots": [
        ("set", "a", 30.0),
        ("set", "b", 10.0),
        ("set", "c", 20.0),
        ("wake", 10.0),
        ("start", 5.0, []),
        ("start", 40.0, ["b", "c"]),
        ("wake", None),  # every slot taken: a finishing scan wakes the loop
        ("start", 40.0, []),
        ("finish", "b"),  # no new due time given: due at 10 again, overdue
        ("start", 40.0, ["b"]),
    ],
    "a re-planned host is due at its new time only": [
        ("set", "a", 10.0),
        ("set", "a", 50.0),
        ("set", "b", 20.0),
        ("start", 30.0, ["b"]),
        ("wake", 50.0),
        ("start", 60.0, ["a"]),
        ("start", 60.0, []),
    ],
    "a host re-planned while scanning waits for its scan to end": [
        ("set", "a", 10.0),
        ("start", 10.0, ["a"]),
        ("set", "a", 15.0),
        ("start", 20.0, []),
        ("finish", "a"),
        ("start", 20.0, ["a"]),
    ],
    "the same due time given twice starts the host once": [
        ("set", "a", 10.0),
        ("set", "a", 10.0),
        ("start", 10.0, ["a"]),
        ("wake", None),
    ],
    "a reload keeps only the hosts it names": [
        ("set", "a", 10.0),
        ("set", "b", 10.0),
        ("replace", {"b": 12.0, "c": 11.0}),
        ("wake", 11.0),
        ("start", 20.0, ["c", "b"]),
    ],
    "a host scanning through a reload is not started twice": [
        ("set", "a", 10.0),
        ("start", 10.0, ["a"]),
        ("replace", {"a": 10.0, "b": 30.0}),
        ("start", 20.0, []),
        ("wake", 30.0),
    ],
}


@pytest.mark.parametrize("steps", DUE_TIMES_CASES.values(), ids=DUE_TIMES_CASES.keys())
def test_due_times(steps: list[tuple[object, ...]]) -> None:
    due = DueTimes(max_running=2)
    for step in steps:
        match step:
            case ("set", str(host), float(when)):
                due.set(host, when)
            case ("finish", str(host)):
                due.finish(host)
            case ("replace", dict(times)):
                due.replace_all(times)
            case ("start", float(now), list(expected)):
                assert due.start_due(now) == expected, step
            case ("wake", expected):
                assert due.next_wake() == expected, step
            case _:
                raise AssertionError(f"unknown step {step}")


def test_due_times_cost_does_not_grow_with_the_fleet() -> None:
    """65,536 hosts re-planned one at a time: each decision touches a handful of entries,
    and stale entries do not pile up."""
    due = DueTimes(max_running=64)
    hosts = [f"10.83.{i // 256}.{i % 256}" for i in range(65_536)]
    due.replace_all({host: float(i) for i, host in enumerate(hosts)})
    now = 0.0
    for _round in range(3):
        finished = 0
        while finished < len(hosts):
            now += 1.0
            started = due.start_due(now)
            for host in started:
                due.set(host, now + 100_000.0)
                due.finish(host)
            finished += len(started)
        assert len(due._heap) <= 2 * len(hosts)
