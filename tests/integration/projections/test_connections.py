"""The runners' own connections: named for pg_stat_activity, and commits that skip the disk flush
only where that is safe (following the log; a rebuild's connections keep durable commits)."""

from __future__ import annotations

import pytest

from projections.service import connector
from tests.conftest import make_settings


@pytest.mark.parametrize(("durable", "expected"), [(True, "on"), (False, "off")])
async def test_synchronous_commit_follows_the_choice(database_url: str, durable: bool, expected: str) -> None:
    connect = connector(database_url, make_settings(database_url), durable_commits=durable)
    conn = await connect("tally-test-connector")
    try:
        assert await conn.fetchval("show synchronous_commit") == expected
        assert await conn.fetchval("show application_name") == "tally-test-connector"
    finally:
        await conn.close()
