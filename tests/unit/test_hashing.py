"""The canonical time format: every aware moment, whatever its zone or fraction, as strftime renders it in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from backend.store.hashing import format_time, quoted_time

zones = st.just(UTC) | st.integers(-23 * 60, 23 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes)))
moments = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1), timezones=zones)


@given(moment=moments | moments.map(lambda m: m.replace(microsecond=0)))
def test_format_time_is_utc_with_six_fraction_digits(moment: datetime) -> None:
    expected = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert format_time(moment) == expected
    assert quoted_time(moment) == f'"{expected}"'.encode()
