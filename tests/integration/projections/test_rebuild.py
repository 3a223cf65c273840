"""Read model == rebuild from scratch, after a random workload during which runners crashed mid-batch
(their connection killed inside the batch's transaction, or their task cancelled); rebuilding while
commands and live runners go on; what a rebuild preserves and refuses; what a failed one leaves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest

from backend.db import Connection
from projections import leader, registry, scratch_schemas
from projections.base import Projection
from projections.events import Event
from projections.rebuild import SCHEMAS, RebuildError, rebuild
from projections.service import connector
from tests.integration.projections.harness import Node, settings_for
from tests.integration.projections.oracle import actual_tables, assert_same, expected_tables
from tests.integration.projections.test_read_models import without_expiry_commands
from tests.integration.projections.workload import Workload
from tests.support import eventually

TABLES = [table for projection in registry.all_projections() for table in projection.tables]


class Crashing(Projection):
    """Applies a batch, then (sometimes) kills its own connection before the runner can commit."""

    def __init__(self, inner: Projection, rng: random.Random, rate: float) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.types = inner.types  # type: ignore[misc]
        self.tables = inner.tables  # type: ignore[misc]
        self.rng = rng
        self.rate = rate
        self.crashes = 0

    async def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        await self.inner.apply(conn, events)
        if self.rng.random() < self.rate:
            self.crashes += 1
            await conn.execute("select pg_terminate_backend(pg_backend_pid())")

    async def tick(self, conn: Connection) -> float | None:
        return await self.inner.tick(conn)


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every read-model table, every column."""
    return {t: [tuple(r) for r in await pool.fetch(f"select * from {t} as row order by row::text")] for t in TABLES}


async def test_read_models_equal_a_rebuild_after_crashes_mid_batch(own_database_url: str) -> None:
    node = await Node.open(own_database_url, settings_for(own_database_url, projection_batch_size=5))
    rng = random.Random(5)
    crashing = [Crashing(p, rng, 0.15) for p in registry.all_projections(node.bus)]
    restarts = 0
    try:
        await node.start(crashing)
        done = asyncio.Event()

        async def chaos() -> None:
            """Now and then cancel every runner task wherever it is, then start them again."""
            nonlocal restarts
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(rng.uniform(0.05, 0.3)):  # random fault timing
                        await done.wait()
                await node.stop()
                await node.start(crashing)
                restarts += 1

        chaos_task = asyncio.create_task(chaos())
        await Workload(node.bus, seed=11).run(600, clients=6)
        done.set()
        await chaos_task
        await node.stop()
        assert sum(c.crashes for c in crashing) > 0 and restarts > 0

        await node.start(without_expiry_commands())
        await eventually(node.caught_up, what="projections to catch up after the crashes")
        live = await snapshot(node.pool)
        assert_same(await actual_tables(node.pool), await expected_tables(node.store))

        result = await rebuild(connector(own_database_url, node.settings), registry.all_projections(), batch_size=100)
        assert result.events == await node.pool.fetchval("select count(*) from events")
        assert await snapshot(node.pool) == live
        assert await node.caught_up()
    finally:
        await node.close()


async def test_rebuild_while_commands_and_live_runners_go_on(node: Node) -> None:
    await node.start(without_expiry_commands())
    await Workload(node.bus, seed=3).run(300)
    indexes_before = await node.pool.fetch(
        "select tablename, indexname, indexdef from pg_indexes where tablename = any($1) order by 2", TABLES)

    writer = asyncio.create_task(Workload(node.bus, seed=4).run(300, clients=2))
    result = await rebuild(connector(node.dsn, node.settings), registry.all_projections(), batch_size=50)
    await writer
    assert set(result.checkpoints) == set(registry.names())

    await eventually(node.caught_up, what="projections to catch up after the rebuild")
    assert_same(await actual_tables(node.pool), await expected_tables(node.store))
    indexes_after = await node.pool.fetch(
        "select tablename, indexname, indexdef from pg_indexes where tablename = any($1) order by 2", TABLES)
    assert indexes_after == indexes_before
    persistence = await node.pool.fetch("select relpersistence from pg_class where relname = any($1)", TABLES)
    assert {row[0] for row in persistence} == {b"p"}  # built unlogged, swapped in logged
    assert not await node.pool.fetchval("select count(*) from pg_namespace where nspname like 'tally_rebuild_%'")


async def test_one_rebuild_per_projection_at_a_time(node: Node) -> None:
    holder = await asyncpg.connect(node.dsn)
    try:
        assert await leader.try_lock(holder, leader.REBUILD, "balances")
        with pytest.raises(RebuildError, match="already being rebuilt"):
            await rebuild(connector(node.dsn, node.settings), registry.select(["balances"]))
    finally:
        await holder.close()
    result = await rebuild(connector(node.dsn, node.settings), registry.select(["balances"]))
    assert result.names == ("balances",)


SCHEMAS_SQL = "select coalesce(array_agg(nspname order by nspname), '{}') from pg_namespace " \
              "where starts_with(nspname, 'tally_rebuild_')"


async def test_a_failed_rebuild_never_drops_a_schema_whose_lock_is_held(
    node: Node, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cleanup after a failure takes each lock before it drops: a rebuild of that projection that
    started meanwhile keeps its schema, and the one it could not drop is named in one line."""
    monkeypatch.setattr(scratch_schemas, "CLEANUP_LOCK_TIMEOUT", "100ms")
    holder = await asyncpg.connect(node.dsn)
    try:
        assert await leader.try_lock(holder, leader.REBUILD, "balances")
        await holder.execute("create schema tally_rebuild_balances; create schema tally_rebuild_stats")
        with caplog.at_level(logging.WARNING, logger=scratch_schemas.__name__):
            await SCHEMAS.drop_after_failure(connector(node.dsn, node.settings),
                                             ["tally_rebuild_stats", "tally_rebuild_balances"])
        assert await holder.fetchval(SCHEMAS_SQL) == ["tally_rebuild_balances"]
        [line] = caplog.messages
        assert line.startswith("could not drop tally_rebuild_balances after the failed rebuild "
                               "(LockNotAvailableError"), line
    finally:
        await holder.close()


async def test_a_failed_rebuild_that_cannot_reconnect_says_what_it_left(
    node: Node, caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens on it
    with caplog.at_level(logging.WARNING, logger=scratch_schemas.__name__):
        await SCHEMAS.drop_after_failure(connector(f"postgresql://tally@127.0.0.1:{port}/tally", node.settings),
                                         ["tally_rebuild_balances", "tally_rebuild_stats"])
    [line] = caplog.messages
    assert line.startswith("could not drop tally_rebuild_balances, tally_rebuild_stats after the failed rebuild"), line
    assert line.endswith("; the next rebuild drops it"), line


async def test_a_leftover_the_server_will_not_drop_is_one_line_and_the_rebuild_goes_on(
    node: Node, caplog: pytest.LogCaptureFixture,
) -> None:
    """Someone holds a lock on a dead rebuild's table: dropping it waits out statement_timeout. That
    stopped the rebuild of another projection, which does not need the leftover gone."""
    holder = await asyncpg.connect(node.dsn)
    try:
        await holder.execute("create schema tally_rebuild_stats; create table tally_rebuild_stats.kept (n int)")
        impatient = node.settings.model_copy(update={"statement_timeout_ms": 200})
        async with holder.transaction():
            await holder.execute("lock table tally_rebuild_stats.kept in access share mode")
            with caplog.at_level(logging.INFO, logger=scratch_schemas.__name__):
                result = await rebuild(connector(node.dsn, impatient), registry.select(["balances"]))
        assert result.names == ("balances",)
        assert caplog.messages == ["could not drop schema tally_rebuild_stats, left by a rebuild that did not finish "
                                   "(QueryCanceledError: canceling statement due to statement timeout)"]
        assert await holder.fetchval(SCHEMAS_SQL) == ["tally_rebuild_stats"]
    finally:
        await holder.close()
