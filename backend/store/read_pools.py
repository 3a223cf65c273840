"""Where a read goes: a streaming replica in use (READ_DATABASE_URL), else the primary.

Commands, projection runners, leader locks and LISTEN never come here: they hold the primary's pool
or connections of their own. A read does: `ReadPools.read(fn)` runs `fn` with a replica's pool when
one is in use and with the primary's otherwise, and a read that the database fails on a replica is
run again on the primary at once, so a replica's failure never reaches a client. When the reason is
one `backend.db.is_unavailable` knows (the replica stopped, restarted, refused a connection), that
replica is out of use until the checker (backend/store/replica_check.py) finds it answering within
REPLICA_MAX_LAG_S. A replica that hangs (a frozen host: connections open, nothing answers) fails no
read by itself; the checker finds it silent and cuts it off (`ReadPools.cut_off`), so that the reads
waiting on it go to the primary then, not after COMMAND_TIMEOUT_S.

A replica replays the primary's log in commit order, so what it shows is always a prefix of the log
(positions become visible in order on the primary, and WAL replays commits in that order). It may
be behind: `at_least=P` asks for a replica that has replayed position P, checked on the very
connection that then runs the read (a replica only moves forward while it runs, and a restart closes
the connection), never from a remembered figure, which a restarted replica could contradict.

`fn` must be a pure read that can run twice: it may have started on the replica when it is run
again on the primary. Every replica session is read-only (default_transaction_read_only), so even
a mistaken write fails there rather than diverge; a hot standby refuses writes anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from backend.config import Settings, dsn_label
from backend.db import Connection, connect_kwargs, describe, is_unavailable, pool_options
from backend.store.reads import HEAD_SQL, Executor

log = logging.getLogger(__name__)

T = TypeVar("T")

ONLY_RETRIED = (asyncpg.exceptions.TransactionRollbackError, asyncpg.exceptions.ReadOnlySQLTransactionError)
"""Failures of one read on a replica that say nothing of the replica's health: a query cancelled by a
conflict with recovery (class 40), and a write, which a replica refuses by design."""

Ready = Callable[[Connection], Awaitable[bool]]
"""Whether a replica's connection can answer a read (it has replayed what the read needs)."""


@contextlib.asynccontextmanager
async def connection(db: Executor) -> AsyncIterator[Connection]:
    """db as one connection: a pool's is acquired for the block, a connection is itself."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db


async def by_deadline(deadline: float, work: Awaitable[T]) -> T | None:
    """work's answer if it comes by `deadline` (the loop's clock), else None. Past the deadline the work is
    cancelled but not waited for: cancelling a query on a server that hangs waits for the cancel request's
    own connection (CONNECT_TIMEOUT_S), which would hold the caller past its deadline after all."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
    except BaseException:
        task.cancel()
        raise
    if done:
        return task.result()
    task.cancel()
    task.add_done_callback(_forget)
    return None


def _forget(task: asyncio.Task[object]) -> None:
    """An abandoned read's end: whatever it raised was already handled as the primary answered."""
    if not task.cancelled():
        task.exception()


@dataclass(slots=True)
class Replica:
    label: str
    pool: asyncpg.Pool
    reopen: Callable[[], Awaitable[asyncpg.Pool]] | None = None
    """A fresh pool on the same replica, replacing one that was cut off (None: the pool is kept)."""
    in_use: bool = False
    """Serves reads: the last check found it answering within the lag bound, and no read failed since."""
    head: int | None = None
    """The last position it had replayed at the last check (None: unknown)."""
    lag_events: int | None = None
    lag_s: float | None = None
    """Age of the oldest event it had not replayed at the last check (0: it had everything)."""
    last_error: str | None = None
    reads: int = 0
    """Reads it served."""
    fallbacks: int = 0
    """Reads that failed on it and were served by the primary."""

    def report(self) -> dict[str, object]:
        return {"in_use": self.in_use, "lag_s": self.lag_s, "lag_events": self.lag_events, "head": self.head,
                "last_error": self.last_error}


class ReadPools:
    def __init__(self, primary: Executor, replicas: Sequence[Replica] = ()) -> None:
        self.primary = primary
        self.replicas = list(replicas)
        self._turn = itertools.count()

    @classmethod
    def of(cls, db: Executor | ReadPools) -> ReadPools:
        """db as read pools: itself, or a lone primary (no replica)."""
        return db if isinstance(db, ReadPools) else cls(db)

    def pick(self) -> Replica | None:
        """A replica in use (in turn, when there are several), or None: read the primary."""
        if not self.replicas:
            return None
        usable = [replica for replica in self.replicas if replica.in_use]
        if not usable:
            return None
        return usable[next(self._turn) % len(usable)]

    def failed(self, replica: Replica, exc: BaseException) -> None:
        """A read failed on the replica: out of use until the checker finds it back."""
        replica.fallbacks += 1
        replica.last_error = describe(exc)
        if replica.in_use:
            replica.in_use = False
            log.warning("read replica failed, reads go to the primary",
                        extra={"replica": replica.label, "reason": replica.last_error})

    async def cut_off(self, replica: Replica) -> None:
        """The replica stopped answering: out of use, and its pool replaced by a fresh one and the old one
        terminated, so that every read waiting on one of its connections fails at once and is served by
        the primary (attempt) instead of waiting out COMMAND_TIMEOUT_S."""
        replica.in_use = False
        if replica.reopen is None:
            return
        silent, replica.pool = replica.pool, await replica.reopen()
        silent.terminate()

    @contextlib.asynccontextmanager
    async def attempt(self, replica: Replica) -> AsyncIterator[None]:
        """Run a block against the replica; if the database fails it, swallow the error (the caller falls
        back to the primary). A replica that turns out unavailable is taken out of use; any other
        database error is only retried on the primary: a query cancelled by a conflict with recovery
        (ONLY_RETRIED), a table a migration has not yet brought to the replica. A bug fails on the
        primary too, and is reported from there. Errors that are not the database's propagate."""
        try:
            yield
        except Exception as exc:
            if is_unavailable(exc) and not isinstance(exc, ONLY_RETRIED):
                self.failed(replica, exc)
            elif isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
                replica.fallbacks += 1
                replica.last_error = describe(exc)
                log.info("read failed on a replica, served by the primary",
                         extra={"replica": replica.label, "reason": replica.last_error})
            else:
                raise

    async def on_replica(self, fn: Callable[[Executor], Awaitable[T]], *, at_least: int = 0,
                         ready: Ready | None = None) -> tuple[T] | None:
        """fn's answer from a replica in use that has replayed position at_least (and for which `ready`
        holds, asked on the connection fn then runs on), or None: no replica was in use, it had not
        replayed that far, or it failed (then it is out of use)."""
        replica = self.pick()
        if replica is None:
            return None
        async with self.attempt(replica):
            if at_least <= 0 and ready is None:
                value = await fn(replica.pool)
            else:
                async with replica.pool.acquire() as conn:
                    if at_least > 0 and await conn.fetchval(HEAD_SQL) < at_least:
                        return None
                    if ready is not None and not await ready(conn):
                        return None
                    value = await fn(conn)
            replica.reads += 1
            return (value,)
        return None

    async def read(self, fn: Callable[[Executor], Awaitable[T]], *, at_least: int = 0,
                   ready: Ready | None = None) -> T:
        """fn's answer from a replica in use (that has replayed at_least, and is `ready`), else from the
        primary."""
        if self.replicas:
            served = await self.on_replica(fn, at_least=at_least, ready=ready)
            if served is not None:
                return served[0]
        return await fn(self.primary)

    def report(self) -> dict[str, dict[str, object]]:
        return {replica.label: replica.report() for replica in self.replicas}

    async def close(self) -> None:
        """Close the replicas' pools and stop choosing them: the primary (not closed here) serves on."""
        replicas, self.replicas = self.replicas, []
        for replica in replicas:
            await replica.pool.close()


async def open_replica(dsn: str, settings: Settings) -> Replica:
    """A replica's pool: read-only sessions, no connection opened yet (a replica that is down at startup
    does not stop the process; the checker finds out)."""
    options = connect_kwargs(settings)
    options["server_settings"] = {**options["server_settings"], "default_transaction_read_only": "on"}

    async def pool() -> asyncpg.Pool:
        opened = await asyncpg.create_pool(dsn, min_size=0, max_size=settings.pool_max_size,
                                           **pool_options(replica=True), **options)
        assert opened is not None
        return opened

    return Replica(dsn_label(dsn), await pool(), reopen=pool)
