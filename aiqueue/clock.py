"""An injectable UTC clock: nothing else calls datetime.now(); tests move time."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)


class FrozenClock:
    """A clock that only moves when told to (tests, demo)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(timezone.utc)
        if self._now.tzinfo is None:
            raise ValueError("FrozenClock needs an aware datetime")

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | float) -> None:
        self._now += delta if isinstance(delta, timedelta) else timedelta(seconds=delta)


MAX_DURATION_DAYS = 3650  # ten years: longer is a typo


def parse_duration(text: str) -> timedelta:
    """'90s', '10m', '1h', '1h30m', '2d' or a bare number of seconds -> timedelta."""
    raw = text.strip().lower()
    if not raw:
        raise ValueError("empty duration")
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
        number = ""
        for ch in raw:
            if ch.isdigit() or ch == ".":
                number += ch
            elif ch in units and number:
                seconds += float(number) * units[ch]
                number = ""
            else:
                raise ValueError(f"bad duration {text!r} (use e.g. 90s, 10m, 1h)") from None
        if number:
            raise ValueError(f"bad duration {text!r}: a number without a unit at the end")
    if math.isnan(seconds):
        raise ValueError(f"bad duration {text!r} (use e.g. 90s, 10m, 1h)")
    if seconds <= 0:
        raise ValueError(f"bad duration {text!r}: must be positive")
    if seconds > MAX_DURATION_DAYS * 86400:  # also inf, and what timedelta() would overflow on
        raise ValueError(f"bad duration {text!r}: too long (at most {MAX_DURATION_DAYS}d)")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    total = int(delta.total_seconds())
    if total < 0:
        total = 0
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{seconds:02d}s" if seconds else f"{minutes}m"
    return f"{seconds}s"
