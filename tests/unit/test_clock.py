"""The clock every module outside the domain is given: the host's, or one a test moves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from backend.clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock


def test_the_system_clock_is_aware_utc_and_moves() -> None:
    first = SYSTEM_CLOCK.now()
    assert first.tzinfo is UTC
    assert SystemClock().now() >= first


def test_a_manual_clock_stands_still_until_advanced() -> None:
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    clock: Clock = ManualClock(start)
    assert clock.now() == clock.now() == start
    assert isinstance(clock, ManualClock)
    assert clock.advance(1.5) == start + timedelta(seconds=1.5)
    assert clock.advance(timedelta(minutes=1)) == start + timedelta(seconds=61.5) == clock.now()


def test_a_manual_clock_is_utc_and_never_goes_back() -> None:
    clock = ManualClock(datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2))))
    assert clock.now() == datetime(2026, 1, 1, 10, tzinfo=UTC) and clock.now().tzinfo is UTC
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="timezone"):
        ManualClock(datetime(2026, 1, 1))  # naive on purpose
    assert clock.now() == datetime(2026, 1, 1, 10, tzinfo=UTC)
