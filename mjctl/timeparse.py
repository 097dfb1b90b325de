"""Times given by people: epoch seconds (or milliseconds), ISO-8601 dates and times, or ages like 30m."""

from __future__ import annotations

import re
import time
from datetime import datetime

from mjctl.errors import UsageError
from mjctl.tasks import normalize_seconds

_AGE = re.compile(r"^(\d+)\s*([smhdw])$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, option: str = "time", now: float | None = None) -> int:
    """Epoch seconds for text; naive ISO times are local time. Raises UsageError naming the option."""
    value = (text or "").strip()
    if not value:
        raise UsageError(f"{option} is empty; give epoch seconds, an ISO-8601 date or time, or an age like 30m.")
    if value.isdigit():
        return normalize_seconds(int(value))
    match = _AGE.match(value)
    if match:
        now = time.time() if now is None else now
        return int(now - int(match.group(1)) * _UNITS[match.group(2).lower()])
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not a time; give epoch seconds, an ISO-8601 date or time, "
            "or an age like 30m, 2h, 7d."
        ) from None
    return int(parsed.timestamp())


def parse_duration(text: str, *, option: str = "duration") -> int:
    """Seconds for an age like 30d, 12h or a bare number of seconds."""
    value = (text or "").strip()
    if value.isdigit():
        return int(value)
    match = _AGE.match(value)
    if not match:
        raise UsageError(f"{option} {text!r} is not a duration; use a number of seconds or an age like 30m, 12h, 30d.")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]
