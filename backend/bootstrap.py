"""The core every process opens the same way: the database (DATABASE_URL or the embedded server),
the pool (migrated when APPLY_MIGRATIONS), the event store, this process's one LISTEN connection and
its one tail of the log (started by its first follower), where reads go (the primary; `serve` adds
READ_DATABASE_URL's replicas), the repository, the command bus and the clock. The migration and LISTEN
hold sessions, so they connect to DIRECT_DATABASE_URL (which bypasses a pooler in transaction mode;
default DATABASE_URL). `serve` (backend.app.create_app adds the web-only parts around it), the
projection worker, the command line and the tests all open it here, so the wiring is written once."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from backend.clock import SYSTEM_CLOCK, Clock
from backend.commands.bus import CommandBus
from backend.config import Settings
from backend.db import (
    connect_kwargs,
    create_pool,
    direct_connection,
    mask_dsn,
    require_same_database,
    warn_without_statement_timeout,
)
from backend.dsn import database_dsn
from backend.store.event_store import EventStore
from backend.store.listener import Listener
from backend.store.migrate import migrate, require_migrated
from backend.store.read_pools import ReadPools
from backend.store.repository import Repository
from backend.store.tail import LogTail
from backend.supervisor import Supervisor

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Core:
    settings: Settings
    dsn: str
    pool: asyncpg.Pool
    direct_dsn: str
    """DIRECT_DATABASE_URL (default: dsn): for connections that hold a session (LISTEN, leader locks)."""
    reads: ReadPools
    """Where reads go: the primary's pool, and the replicas `serve` adds (READ_DATABASE_URL)."""
    store: EventStore
    listener: Listener
    tail: LogTail
    repository: Repository
    bus: CommandBus
    clock: Clock
    supervisor: Supervisor


@contextlib.asynccontextmanager
async def open_core(settings: Settings, *, dsn: str | None = None, clock: Clock = SYSTEM_CLOCK,
                    supervisor: Supervisor | None = None) -> AsyncIterator[Core]:
    """Open the core, yield it, close it in reverse order (the store before the listener, the pool
    last). dsn None: DATABASE_URL, or the embedded server. A supervisor not given is made here and
    closed last. Without APPLY_MIGRATIONS, a database not up to date is refused (NotMigrated, one line)
    before anything else reads it, rather than a listener that cannot start on the missing tables ending
    in a TimeoutError once its start timeout has passed."""
    async with contextlib.AsyncExitStack() as stack:
        if supervisor is None:
            supervisor = Supervisor()  # runs and restarts the listener (and whatever the caller adds)
            stack.push_async_callback(supervisor.close)
        if dsn is None:
            dsn = await stack.enter_async_context(database_dsn(settings))
        pool = await create_pool(dsn, settings)
        stack.push_async_callback(pool.close)
        log.info("database pool open", extra={"database": mask_dsn(dsn), "max_size": settings.pool_max_size})
        await warn_without_statement_timeout(pool, settings)
        direct = settings.direct_dsn(dsn)  # sessions of their own: the migration lock and LISTEN
        if direct != dsn:
            await require_same_database(pool, dsn, direct, settings)
        if settings.apply_migrations:
            async with direct_connection(direct, settings) as conn:
                await migrate(conn)
        else:
            async with pool.acquire() as conn:
                await require_migrated(conn, mask_dsn(dsn))
        listener = Listener(direct, poll_interval_s=settings.listener_poll_s, connect_kwargs=connect_kwargs(settings),
                            supervisor=supervisor)
        stack.push_async_callback(listener.close)
        await listener.start(timeout=settings.connect_timeout_s + 5)
        store = EventStore(pool, max_batch_events=settings.append_batch_max_events)
        stack.push_async_callback(store.close)
        reads = ReadPools(pool)
        tail = LogTail(reads, listener, page_size=settings.sse_page_size, idle_s=settings.sse_checkpoint_s,
                       supervisor=supervisor)
        stack.push_async_callback(tail.close)
        repository = Repository(store, snapshot_every=settings.snapshot_every)
        yield Core(settings, dsn, pool, direct, reads, store, listener, tail, repository,
                   CommandBus(repository, clock=clock), clock, supervisor)
