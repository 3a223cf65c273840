"""Session advisory locks: one leader per projection, one rebuild per projection, across processes.

A lock lives as long as the connection that took it, so a dead process (its socket closed) gives it
up at once, and a runner that loses its connection loses the lead with it. Keys are
(namespace, hashtext(name)), computed by the server so every process agrees on them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from backend.db import Connection
from backend.store.reads import Executor

Connect = Callable[[str], Awaitable["asyncpg.Connection[asyncpg.Record]"]]
"""Open a dedicated connection (initialised like the pool's) under the given application_name."""

LEADER = 0x7A11_0005
"""Namespace of "runs projection <name>" locks (0x7A11_0001 and _0002 are the store's)."""
REBUILD = 0x7A11_0006
"""Namespace of "rebuilds projection <name>" locks."""

TRY_LOCK_SQL = "select pg_try_advisory_lock($1, hashtext($2))"
# pg_locks shows a two-key advisory lock as classid = key 1, objid = key 2, objsubid = 2.
HOLDERS_SQL = """
select n.name, l.pid, a.application_name
from unnest($2::text[]) as n(name)
join pg_locks l on l.locktype = 'advisory' and l.granted and l.objsubid = 2
    and l.classid = $1::int::oid and l.objid = hashtext(n.name)::oid
    and l.database = (select oid from pg_database where datname = current_database())
left join pg_stat_activity a on a.pid = l.pid
"""


async def try_lock(conn: Connection, namespace: int, name: str) -> bool:
    return bool(await conn.fetchval(TRY_LOCK_SQL, namespace, name))


@contextlib.asynccontextmanager
async def leading(
    connect: Connect, application_name: str, namespace: int, name: str, standby_retry_s: float, *,
    connected: Callable[[asyncpg.Connection[asyncpg.Record]], None] | None = None,
    standing_by: Callable[[], None] | None = None,
) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """One connection's lifetime as a leader (projection runners, the Merkle folder): connect, take the
    lock, standing by and trying again every standby_retry_s until it is ours, and lead on the
    connection yielded. On the way out, however it goes, the connection is terminated, and the lead
    with it: a leader that lost its connection can write nothing more."""
    conn = await connect(application_name)
    try:
        if connected is not None:
            connected(conn)
        while not await try_lock(conn, namespace, name):
            if standing_by is not None:
                standing_by()
            await asyncio.sleep(standby_retry_s)
        yield conn
    finally:
        conn.terminate()  # ends the session at once, and with it the lock


async def holders(db: Executor, namespace: int, names: list[str]) -> dict[str, tuple[int, str]]:
    """name -> (server pid, application_name) of the session holding that lock, where one does."""
    rows = await db.fetch(HOLDERS_SQL, namespace, names)
    return {row["name"]: (row["pid"], row["application_name"] or "") for row in rows}
