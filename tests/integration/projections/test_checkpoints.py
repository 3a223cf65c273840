"""Checkpoint moves: a step fences and advances in one statement (sent with its batch's BEGIN when it has
a batch), and a moved checkpoint (a rebuild swapped tables in) still stops it, changing nothing."""

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
        assert row is not None
        assert (row["position"], row["error"], row["failures"]) == (9, None, 0)  # advancing clears a failure
        with pytest.raises(checkpoints.Fenced, match="checkpoint is 9, expected 0"):
            await checkpoints.advance_from(conn, "probe", 0, 12)  # a stale runner: nothing changes
        assert await checkpoints.load(conn, "probe") == 9
    finally:
        await conn.close()


async def test_begin_batch_fences_and_advances_with_the_batch(own_database_url: str) -> None:
    conn = await asyncpg.connect(own_database_url)
    try:
        await migrate(conn)
        await checkpoints.load(conn, "it's")  # a name that needs quoting in the literal
        await checkpoints.begin_batch(conn, "it's", 0, 5)
        await conn.execute("rollback")  # the batch failed: its checkpoint move goes with it
        assert await checkpoints.load(conn, "it's") == 0
        await checkpoints.begin_batch(conn, "it's", 0, 5)
        assert conn.is_in_transaction()
        await conn.execute("commit")
        assert await checkpoints.load(conn, "it's") == 5
        with pytest.raises(checkpoints.Fenced, match="checkpoint is 5, expected 0"):
            await checkpoints.begin_batch(conn, "it's", 0, 7)  # a stale runner: nothing changes
        assert not conn.is_in_transaction() and await checkpoints.load(conn, "it's") == 5
        await conn.execute("begin; update projection_checkpoints set position = 99")  # left by a failed batch
        await checkpoints.begin_batch(conn, "it's", 5, 6)  # not inside that one
        await conn.execute("commit")
        rows = await conn.fetch("select name, position from projection_checkpoints")
        assert [tuple(row) for row in rows] == [("it's", 6)]
    finally:
        await conn.close()
