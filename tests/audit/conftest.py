"""Audit test helpers: a database of the test's own (for tampering), a realistic log, tampering."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from backend.audit.export import export_pages
from backend.db import pool_options
from backend.store.event_store import EventStore
from backend.store.events import NewEvent, Write


@pytest.fixture
async def own_pool(own_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(own_database_url, min_size=1, max_size=4, **pool_options())
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@dataclass(frozen=True)
class Log:
    streams: list[str]
    events: int
    positions: dict[tuple[str, int], int]
    """(stream_id, version) -> position."""

    def position(self, stream_id: str, version: int) -> int:
        return self.positions[(stream_id, version)]


def wallet_event(rng: random.Random, version: int) -> NewEvent:
    occurred_at = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
    if version == 1:
        return NewEvent("WalletOpened", {"owner": "alice", "currency": "USD", "occurred_at": occurred_at})
    kind = "WalletCredited" if version % 2 else "WalletDebited"
    return NewEvent(kind, {"amount": rng.randrange(1, 10_000), "reference": f"ref-{version}",
                           "occurred_at": occurred_at}, {"schema_version": 1, "actor": "test"})


async def fill_log(pool: asyncpg.Pool, streams: int = 12, versions: int = 6, seed: int = 1) -> Log:
    """`streams` wallet streams of `versions` events each, interleaved round by round over the log."""
    rng = random.Random(seed)
    store = EventStore(pool)
    ids = [f"wallet-{uuid.UUID(int=rng.getrandbits(128), version=4)}" for _ in range(streams)]
    positions: dict[tuple[str, int], int] = {}
    try:
        for version in range(1, versions + 1):
            writes = [Write(s, version - 1, [wallet_event(rng, version)]) for s in ids]
            result = await store.append(writes)
            for appended in result.streams:
                positions[(appended.stream_id, appended.version)] = appended.positions[0]
    finally:
        await store.close()
    return Log(ids, streams * versions, positions)


async def export_file(pool: asyncpg.Pool, path: Path, after: int = 0) -> Path:
    async with pool.acquire() as conn:
        with path.open("wb") as out:
            async for chunk in export_pages(conn, after):
                out.write(chunk)
    return path


async def tamper(dsn: str, sql: str, *args: object) -> None:
    """Run one statement as a superuser with the immutability triggers switched off around it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("alter table events disable trigger user")
        try:
            status = await conn.execute(sql, *args)
        finally:
            await conn.execute("alter table events enable trigger user")
        assert status.split()[-1] != "0", f"tampering touched no row: {status}"
    finally:
        await conn.close()
