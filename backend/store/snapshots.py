"""Snapshots of aggregates (table `snapshots`): a cache of folded state, never a source of truth.

Their own small store, so the repository never runs SQL on the event store's pool."""

from __future__ import annotations

from typing import Any

import asyncpg

LOAD_SQL = "select version, state from snapshots where stream_id = $1 order by version desc limit 1"
SAVE_SQL = """
insert into snapshots (stream_id, version, type, state) values ($1, $2, $3, $4::text::jsonb)
on conflict do nothing
"""


class SnapshotStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def latest(self, stream_id: str) -> tuple[int, dict[str, Any]] | None:
        """The stream's newest snapshot as (version, payload), or None."""
        row = await self._pool.fetchrow(LOAD_SQL, stream_id)
        return None if row is None else (row["version"], row["state"])

    async def save(self, stream_id: str, version: int, type_name: str, payload_json: str) -> None:
        """Keep a snapshot (a second one at the same version is ignored)."""
        await self._pool.execute(SAVE_SQL, stream_id, version, type_name, payload_json)
