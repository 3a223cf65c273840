"""After a scenario: the projections catch up, the read models equal the fold of the log (both by the
test oracle and by `audit diff-projections`'s rebuild), and every hash chain verifies."""

from __future__ import annotations

import asyncpg

from backend.audit.projections_diff import diff_all
from backend.audit.verify import verify_database
from backend.db import init_connection, pool_options
from backend.store.event_store import EventStore
from projections import registry
from projections.service import connector
from tests.conftest import make_settings
from tests.integration.projections.oracle import actual_tables, assert_same, expected_tables
from tests.support import eventually


async def wait_caught_up(pool: asyncpg.Pool, timeout: float = 30) -> None:
    names = registry.names()

    async def caught_up() -> bool:
        head = await pool.fetchval("select coalesce(max(position), 0) from events")
        rows = await pool.fetch("select name, position from projection_checkpoints where name = any($1)", names)
        return len(rows) == len(names) and all(row["position"] >= head for row in rows)

    await eventually(caught_up, timeout=timeout, interval=0.1, what="every projection to reach the head")


async def check_ledger(database_url: str, *, owner_dsn: str | None = None) -> int:
    """Assert the read models and the hash chains; return the head of the log. owner_dsn: a role that
    may create scratch schemas for the diff (the app role of `db roles` may not)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4, **pool_options())
    assert pool is not None
    store = EventStore(pool)
    try:
        await wait_caught_up(pool)
        assert_same(await actual_tables(pool), await expected_tables(store))
        diff_dsn = owner_dsn or database_url
        diff = await diff_all(connector(diff_dsn, make_settings(diff_dsn)))
        assert diff.ok, [t.describe() for t in diff.differences] + list(diff.errors.values())
        conn = await asyncpg.connect(diff_dsn)
        try:
            await init_connection(conn)
            report = await verify_database(conn)
            assert report.ok, [b.as_dict() for b in report.breaks]
            return int(await conn.fetchval("select coalesce(max(position), 0) from events"))
        finally:
            await conn.close()
    finally:
        await store.close()
        await pool.close()
