"""The rebuild's schemas, `tally_rebuild_<name>`: which are leftovers, and dropping them safely.

A rebuild of a projection holds that projection's rebuild lock (`projections.leader.REBUILD`) on the
session that builds its schema, from before the schema is made until after it is swapped in or
dropped. So a schema whose lock nobody holds is a leftover of a rebuild that died (its sessions
ended before it could drop it), and a schema whose lock is held belongs to a rebuild still running:
whoever drops one takes its lock first, and never drops one whose lock it cannot take.
"""

from __future__ import annotations

import logging

from backend.db import describe
from projections import leader
from projections.leader import Connect

log = logging.getLogger(__name__)

PREFIX = "tally_rebuild_"

LOCK_SQL = "select pg_advisory_lock($1, hashtext($2))"
UNLOCK_SQL = "select pg_advisory_unlock($1, hashtext($2))"
CLEANUP_LOCK_TIMEOUT = "5s"
"""How long dropping a failed rebuild's schemas waits for that rebuild's own sessions to end."""


def schema_of(name: str) -> str:
    return PREFIX + name


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
