"""Audit test helpers: a realistic log, its export, tampering with it, and the audit CLI as a process."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from backend.audit.export import export_pages
from backend.store.event_store import EventStore
from backend.store.events import NewEvent, Write
from tests.conftest import ROOT


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


async def audit_cli(*args: str, database_url: str | None = None, cwd: Path = ROOT,
                    data_dir: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TEST_DATABASE_URL", "TALLY_API_KEY")}
    env["LOG_FORMAT"] = "text"
    env.update(extra_env)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    if data_dir is not None:
        env["DATA_DIR"] = str(data_dir)
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "backend", "audit", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )
