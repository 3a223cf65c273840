"""Minting an admin key straight into a database, for tests that run the server as a process."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from backend.commands.api_keys import mint
from backend.db import init_connection
from backend.store.event_store import EventStore
from backend.store.repository import Repository


async def admin_token(database_url: str) -> str:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2, init=init_connection)
    assert pool is not None
    store = EventStore(pool)
    try:
        minted = mint("operator", "system test admin", ["admin"], None, datetime.now(UTC))
        await Repository(store).save(minted.key)
        return minted.token
    finally:
        await store.close()
        await pool.close()
