"""Durations as operators write them: `500ms`, `30s`, `5m`, `12h`, `1d`, `2w`, `1h30m`.

Units follow Prometheus (ms, s, m, h, d, w, y with y = 365d); fractions (`1.5h`) and plain
numbers (seconds) are accepted too. Values are float seconds.
"""

from __future__ import annotations

import math
import re
from datetime import UTC

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


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def parse_duration(value: object) -> float:
    """Seconds in `value`: a duration string, or a plain number of seconds.

    Raises DurationError for anything else, including negative and non-finite numbers.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
        raise DurationError(f"{_show(value)} is not a duration ({_HINT})")
    if not isinstance(value, str):
        raise DurationError(f"{_show(value)} is not a duration ({_HINT})")
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    seconds, position, seen = 0.0, 0, set()
    for match in _PART.finditer(text):
        if match.start() != position or match[2] in seen:
            break
        seen.add(match[2])
        seconds += float(match[1]) * UNITS[match[2]]
        position = match.end()
    if not text or position != len(text):
        raise DurationError(f"{_show(value)} is not a duration ({_HINT})")
    return seconds


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
