"""Test harness for projections: a "node" (what one process holds: the core of backend.bootstrap and
projection runners), condition waits, and apps whose read endpoints are the read-model ones."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from uuid import UUID

import asyncpg

from backend.bootstrap import Core, open_core
from backend.clock import SYSTEM_CLOCK, Clock
from backend.commands.bus import CommandBus, Decision
from backend.commands.context import SYSTEM, CommandContext
from backend.config import Settings
from backend.domain.registry import wallet_stream
from backend.store.event_store import EventStore
from backend.store.listener import Listener
from projections import registry
from projections.base import Projection
from projections.service import ProjectionService, connector
from projections.waiting import CheckpointWatcher
from tests.conftest import make_settings


def settings_for(dsn: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"rate_limit_per_s": 0, "projection_poll_s": 0.2, "projection_standby_retry_s": 0.2,
                              "listener_poll_s": 0.5}
    values.update(overrides)
    return make_settings(dsn, **values)


class Node:
    """Everything one process holds: its core (backend.bootstrap: pool, store, listener, bus, clock) and
    its projection runners. Pass a ManualClock to move time instead of waiting for it."""

    def __init__(self, dsn: str, settings: Settings) -> None:
        self.dsn = dsn
        self.settings = settings
        self.core: Core
        # The parts of the core the tests use most, set by open().
        self.pool: asyncpg.Pool
        self.store: EventStore
        self.listener: Listener
        self.bus: CommandBus
        self.clock: Clock
        self.service: ProjectionService | None = None
        self._closing = contextlib.AsyncExitStack()

    @classmethod
    async def open(cls, dsn: str, settings: Settings | None = None, clock: Clock = SYSTEM_CLOCK) -> Node:
        node = cls(dsn, settings or settings_for(dsn))
        unmigrated = node.settings.model_copy(update={"apply_migrations": False})  # the fixture migrated
        core = node.core = await node._closing.enter_async_context(open_core(unmigrated, dsn=dsn, clock=clock))
        node.pool, node.store, node.listener, node.bus, node.clock = (
            core.pool, core.store, core.listener, core.bus, core.clock)
        return node

    async def start(self, projections: Sequence[Projection] | None = None) -> ProjectionService:
        chosen = registry.all_projections(self.bus, clock=self.clock) if projections is None else projections
        self.service = ProjectionService(chosen, connector(self.dsn, self.settings, durable_commits=False),
                                         CheckpointWatcher(self.pool), self.settings, listener=self.listener,
                                         tail=self.core.tail)
        await self.service.start()
        return self.service

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None

    async def close(self) -> None:
        await self.stop()
        await self._closing.aclose()

    async def on_wallet(self, wallet_id: UUID, decide: Callable[[CommandContext], Awaitable[Decision]]) -> int:
        """Run a system command on one wallet's stream; the position its append took."""
        return (await self.bus.execute(CommandContext(SYSTEM), [wallet_stream(wallet_id)], decide)).position

    async def caught_up(self, names: Sequence[str] | None = None) -> bool:
        """Every named projection's checkpoint is at the head of the log."""
        names = list(names or registry.names())
        head = await self.pool.fetchval("select coalesce(max(position), 0) from events")
        rows = await self.pool.fetch("select name, position from projection_checkpoints where name = any($1)", names)
        return len(rows) == len(names) and all(row["position"] >= head for row in rows)

    async def checkpoint(self, name: str) -> int:
        value = await self.pool.fetchval("select position from projection_checkpoints where name = $1", name)
        return int(value or 0)


