"""The rebuild's schemas, `tally_rebuild_<name>`: which are leftovers, and dropping them safely.

A rebuild of a projection holds that projection's rebuild lock (`projections.leader.REBUILD`) on the
session that builds its schema, from before the schema is made until after it is swapped in or
dropped. So a schema whose lock nobody holds is a leftover of a rebuild that died (its sessions
ended before it could drop it), and a schema whose lock is held belongs to a rebuild still running:
whoever drops one takes its lock first, and never drops one whose lock it cannot take.
"""

from __future__ import annotations

import logging
import re

import asyncpg

from backend.db import Connection, describe
from backend.store.reads import Executor
from projections import leader
from projections.leader import Connect

log = logging.getLogger(__name__)

PREFIX = "tally_rebuild_"
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")

SCHEMAS_SQL = "select nspname from pg_namespace where starts_with(nspname, $1) order by nspname"
LOCK_SQL = "select pg_advisory_lock($1, hashtext($2))"
UNLOCK_SQL = "select pg_advisory_unlock($1, hashtext($2))"
CLEANUP_LOCK_TIMEOUT = "5s"
"""How long dropping a failed rebuild's schemas waits for that rebuild's own sessions to end."""


def schema_of(name: str) -> str:
    return PREFIX + name


async def _names(db: Executor) -> list[str]:
    """Projection names of the rebuild schemas present (only plain identifiers: the rebuild makes no other)."""
    rows = await db.fetch(SCHEMAS_SQL, PREFIX)
    return [name for row in rows if _NAME.match(name := row[0][len(PREFIX):])]


async def leftovers(db: Executor) -> list[str]:
    """The rebuild schemas no running rebuild holds (read only: `projections status` reports them)."""
    names = await _names(db)
    running = await leader.holders(db, leader.REBUILD, names) if names else {}
    return [schema_of(name) for name in names if name not in running]


async def drop_leftovers(conn: Connection) -> list[str]:
    """Drop every rebuild schema whose lock this session can take; the schemas dropped.

    Best effort: one the server refuses to drop (a lock someone holds on it past statement_timeout,
    another role's) is said in one line and left, since the rebuild under way does not need it gone."""
    dropped = []
    for name in await _names(conn):
        if not await leader.try_lock(conn, leader.REBUILD, name):
            continue  # a rebuild of it is running: its schema, not a leftover
        try:
            await conn.execute(f"drop schema if exists {schema_of(name)} cascade")
        except asyncpg.PostgresError as exc:
            log.warning("could not drop schema %s, left by a rebuild that did not finish (%s)",
                        schema_of(name), describe(exc))
            continue
        finally:
            await conn.fetchval(UNLOCK_SQL, leader.REBUILD, name)
        log.info("dropped schema %s, left by a rebuild that did not finish", schema_of(name))
        dropped.append(schema_of(name))
    return dropped


async def drop_after_failure(connect: Connect, names: list[str]) -> None:
    """Drop a failed rebuild's schemas on a fresh session (its own may be the one that was lost).

    Its sessions have been closed: each lock is taken (waiting for the server to end the old session)
    before its schema is dropped, so a rebuild that started meanwhile keeps its own. Best effort: what
    cannot be dropped is said in one line, and the next rebuild drops it."""
    if not names:
        return
    left = [schema_of(name) for name in names]
    try:
        conn = await connect("tally-rebuild-cleanup")
    except Exception as exc:
        _left_behind(left, exc)
        return
    try:
        await conn.execute(f"set lock_timeout = '{CLEANUP_LOCK_TIMEOUT}'")
        for name in names:
            await conn.fetchval(LOCK_SQL, leader.REBUILD, name)
            await conn.execute(f"drop schema if exists {schema_of(name)} cascade")
            left.remove(schema_of(name))
            await conn.fetchval(UNLOCK_SQL, leader.REBUILD, name)
    except Exception as exc:
        _left_behind(left, exc)
    finally:
        conn.terminate()


def _left_behind(schemas: list[str], exc: BaseException) -> None:
    log.warning("could not drop %s after the failed rebuild (%s); the next rebuild drops it",
                ", ".join(schemas), describe(exc))
