"""Durations as operators write them: `500ms`, `30s`, `5m`, `12h`, `1d`, `2w`, `1h30m`.

Units follow Prometheus (ms, s, m, h, d, w, y with y = 365d); fractions (`1.5h`) and plain
numbers (seconds) are accepted too. Values are float seconds, always finite: a duration too
long for a float (`1e400s`, an integer of 400 digits) is refused like any other non-duration.
`format_duration` writes seconds back the same way, for messages that state a range.
"""

from __future__ import annotations

import math
import re
from datetime import UTC

from exporter.portsets import show

UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
    "y": 365 * 86400.0,
}
_HINT = "use e.g. 500ms, 30s, 5m, 12h, 1d"
# "ms" before "m" so that 500ms is not read as 500 minutes followed by garbage.
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h|d|w|y)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")


class DurationError(ValueError):
    """A value that is not a duration; the message is meant for the operator."""


def parse_duration(value: object) -> float:
    """Seconds in `value`: a duration string, or a plain number of seconds.

    Raises DurationError for anything else, including negative and non-finite numbers.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond the range of a float
            seconds = math.inf
        if seconds >= 0:  # False for NaN
            return _finite(seconds, value)
        raise DurationError(f"{show(value)} is not a duration ({_HINT})")
    if not isinstance(value, str):
        raise DurationError(f"{show(value)} is not a duration ({_HINT})")
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return _finite(float(text), value)
    seconds, position, seen = 0.0, 0, set()
    for match in _PART.finditer(text):
        if match.start() != position or match[2] in seen:
            break
        seen.add(match[2])
        seconds += float(match[1]) * UNITS[match[2]]
        position = match.end()
    if not text or position != len(text):
        raise DurationError(f"{show(value)} is not a duration ({_HINT})")
    return _finite(seconds, value)


def _finite(seconds: float, written: object) -> float:
    if not math.isfinite(seconds):
        raise DurationError(f"{show(written)} is too long to be a duration")
    return seconds


def format_duration(seconds: float) -> str:
    """`seconds` in the largest unit that writes it exactly: 0.01 -> 10ms, 300 -> 5m,
    31536000 -> 365d (weeks and years are left out: 365d reads more plainly than 1y)."""
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s", "ms"):
        count = seconds / UNITS[unit]
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    return f"{seconds:g}s"


def parse_point_in_time(value: str, now: float) -> float:
    """A moment as operators write it in `--since`/`?since=`: a duration ago (`7d`), an
    RFC 3339 timestamp (`2026-11-20T10:00:00Z`) or unix seconds (`1763632800`)."""
    text = value.strip()
    if _NUMBER.fullmatch(text) and float(text) > 1e8:
        return float(text)
    try:
        return now - parse_duration(text)
    except DurationError:
        pass
    from datetime import datetime

    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise DurationError(
            f"{text!r} is not a time (use a duration ago like 7d, RFC 3339 or unix seconds)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
