"""Checkpoint moves: a step with nothing to apply fences and advances in one statement, and a moved
checkpoint (a rebuild swapped tables in) still stops it, changing nothing."""

from __future__ import annotations

import asyncpg
import pytest

from backend.store.migrate import migrate
from projections import checkpoints


async def test_advance_from_moves_only_from_the_expected_position(own_database_url: str) -> None:
    conn = await asyncpg.connect(own_database_url)
    try:
        await migrate(conn)
        assert await checkpoints.load(conn, "probe") == 0
        await checkpoints.record_failure(conn, "probe", 3, "boom")
        await checkpoints.advance_from(conn, "probe", 0, 9)
        row = await conn.fetchrow("select position, error, failures from projection_checkpoints where name = 'probe'")
        assert (row["position"], row["error"], row["failures"]) == (9, None, 0)  # advancing clears a failure
        with pytest.raises(checkpoints.Fenced, match="checkpoint is 9, expected 0"):
            await checkpoints.advance_from(conn, "probe", 0, 12)  # a stale runner: nothing changes
        assert await checkpoints.load(conn, "probe") == 9
    finally:
        await conn.close()
