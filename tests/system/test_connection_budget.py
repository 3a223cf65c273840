"""docs/DEPLOYMENT.md's connection budget: a `serve` process holds its pool (POOL_MAX_SIZE at most), one
LISTEN connection, one per projection runner (leading or standing by) and one for the Merkle folder;
with RUN_PROJECTIONS=false and RUN_AUDIT_FOLDER=false, its pool and the LISTEN connection alone. From
its first command on, the append batcher keeps one of the pool's connections for itself: no connection
beyond the budget, but one fewer in the pool for requests."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import asyncpg
import pytest

from projections import registry
from tests.support import eventually_blocking
from tests.system.serving import Server, create_key, serving

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


def pool_in_use(server: Server) -> int:
    """The pool's connections acquired by a request or a task, as /metrics reports them."""
    with urllib.request.urlopen(f"{server.base}/metrics", timeout=10) as reply:
        found = re.search(r"^tally_db_pool_in_use (\S+)$", reply.read().decode(), re.MULTILINE)
    assert found
    return int(float(found[1]))


def open_wallet(server: Server, token: str) -> None:
    request = urllib.request.Request(f"{server.base}/v1/wallets", method="POST",
                                     data=json.dumps({"owner": "ops", "currency": "USD"}).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 201


@pytest.mark.parametrize(("extra", "background"), [
    ({}, len(registry.names()) + 1),
    ({"RUN_PROJECTIONS": "false", "RUN_AUDIT_FOLDER": "false"}, 0),
])
def test_a_serve_process_holds_the_connections_the_guide_budgets(own_database_url: str, extra: dict[str, str],
                                                                 background: int) -> None:
    budget = POOL + 1 + background
    token = create_key(own_database_url)
    with serving(own_database_url, POOL_MIN_SIZE=str(POOL), POOL_MAX_SIZE=str(POOL), **extra) as server:
        eventually_blocking(lambda: sessions(own_database_url) == budget,
                            what=lambda: f"{budget} sessions, not {sessions(own_database_url)}")
        open_wallet(server, token)
        # the batcher keeps one of the pool's connections, idle between batches: POOL - 1 are left for requests
        eventually_blocking(lambda: pool_in_use(server) == 1,
                            what=lambda: f"the batcher's connection alone in use, not {pool_in_use(server)}")
        assert sessions(own_database_url) == budget
