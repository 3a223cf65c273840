"""Test harness for projections: a "node" (what one process holds: pool, store, listener, bus and
projection runners), condition waits, and apps whose read endpoints are the read-model ones."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from backend.commands.bus import CommandBus
from backend.config import Settings
from backend.db import connect_kwargs, pool_options
from backend.store.event_store import EventStore
from backend.store.listener import Listener
from backend.store.repository import Repository
from projections import registry
from projections.base import Projection
from projections.service import ProjectionService, connector
from projections.waiting import CheckpointWatcher
from tests.conftest import make_settings

Check = Callable[[], Awaitable[bool]]


async def eventually(check: Check, timeout: float = 15.0, what: str = "condition") -> None:
    """Wait for check() to hold, polling; fail after timeout (never sleeps to synchronise)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def settings_for(dsn: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"rate_limit_per_s": 0, "projection_poll_s": 0.2, "projection_standby_retry_s": 0.2}
    values.update(overrides)
    return make_settings(dsn, **values)


class Node:
    """Everything one process holds: its own pool, store, listener, bus and projection runners."""

    def __init__(self, dsn: str, settings: Settings) -> None:
        self.dsn = dsn
        self.settings = settings
        self.pool: asyncpg.Pool
        self.store: EventStore
        self.listener: Listener
        self.bus: CommandBus
        self.service: ProjectionService | None = None

    @classmethod
    async def open(cls, dsn: str, settings: Settings | None = None) -> Node:
        node = cls(dsn, settings or settings_for(dsn))
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8, **pool_options())
        assert pool is not None
        node.pool = pool
        node.store = EventStore(pool)
        node.listener = Listener(dsn, poll_interval_s=0.5, connect_kwargs=connect_kwargs(node.settings))
        await node.listener.start()
        node.bus = CommandBus(Repository(node.store))
        return node

    async def start(self, projections: Sequence[Projection] | None = None) -> ProjectionService:
        chosen = registry.all_projections(self.bus) if projections is None else projections
        self.service = ProjectionService(chosen, connector(self.dsn, self.settings, durable_commits=False),
                                         CheckpointWatcher(self.pool), self.settings, listener=self.listener)
        await self.service.start()
        return self.service

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None

    async def close(self) -> None:
        await self.stop()
        await self.listener.close()
        await self.store.close()
        await self.pool.close()

    async def caught_up(self, names: Sequence[str] | None = None) -> bool:
        """Every named projection's checkpoint is at the head of the log."""
        names = list(names or registry.names())
        head = await self.pool.fetchval("select coalesce(max(position), 0) from events")
        rows = await self.pool.fetch("select name, position from projection_checkpoints where name = any($1)", names)
        return len(rows) == len(names) and all(row["position"] >= head for row in rows)

    async def checkpoint(self, name: str) -> int:
        value = await self.pool.fetchval("select position from projection_checkpoints where name = $1", name)
        return int(value or 0)


