"""docs/DEPLOYMENT.md's connection budget: a `serve` process holds its pool (POOL_MAX_SIZE at most), one
LISTEN connection, one per projection runner (leading or standing by) and one for the Merkle folder;
with RUN_PROJECTIONS=false and RUN_AUDIT_FOLDER=false, its pool and the LISTEN connection alone."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from projections import registry
from tests.support import eventually_blocking
from tests.system.serving import serving

pytestmark = pytest.mark.system

POOL = 3


def sessions(database_url: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(await conn.fetchval("select count(*) from pg_stat_activity where datname = current_database()"
                                           " and pid <> pg_backend_pid()"))
        finally:
            await conn.close()

    return asyncio.run(count())


@pytest.mark.parametrize(("extra", "background"), [
    ({}, len(registry.names()) + 1),
    ({"RUN_PROJECTIONS": "false", "RUN_AUDIT_FOLDER": "false"}, 0),
])
def test_a_serve_process_holds_the_connections_the_guide_budgets(own_database_url: str, extra: dict[str, str],
                                                                 background: int) -> None:
    budget = POOL + 1 + background
    with serving(own_database_url, POOL_MIN_SIZE=str(POOL), POOL_MAX_SIZE=str(POOL), **extra):
        eventually_blocking(lambda: sessions(own_database_url) == budget,
                            what=lambda: f"{budget} sessions, not {sessions(own_database_url)}")
