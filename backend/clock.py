"""The wall clock, passed in: every module outside the domain that needs "now" asks a Clock it was
given, so that tests move time (ManualClock) instead of sleeping until a deadline passes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    """The host's clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


SYSTEM_CLOCK = SystemClock()
"""Stateless, so one is enough; the default wherever a clock is optional."""


class ManualClock:
    """A clock that stands still until told to move (tests): `advance` forward, never back."""

    def __init__(self, start: datetime | None = None) -> None:
        start = datetime.now(UTC) if start is None else start
        if start.tzinfo is None:
            raise ValueError("a ManualClock needs a timezone-aware start")
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, by: timedelta | float) -> datetime:
        step = by if isinstance(by, timedelta) else timedelta(seconds=by)
        if step < timedelta(0):
            raise ValueError("time only moves forward")
        self._now += step
        return self._now
