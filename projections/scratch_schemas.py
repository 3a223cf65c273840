"""Schemas a run builds copies of read-model tables in, held by its lock; and the leftovers of runs that died.

A run (a projection rebuild, an audit diff) takes its lock, a session advisory lock, on the session
that builds its schemas before it makes any, and holds it until they are swapped in or dropped. So a
schema whose lock nobody holds is a leftover of a run that died (its sessions ended before it could
drop it), and one whose lock is held belongs to a run still going: whoever drops one takes its lock
first, and never drops one whose lock it cannot take.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from backend.db import Connection, describe
from backend.store.reads import Executor
from projections import leader
from projections.leader import Connect

log = logging.getLogger(__name__)

SCHEMAS_SQL = "select nspname from pg_namespace where starts_with(nspname, $1) order by nspname"
LOCK_SQL = "select pg_advisory_lock($1, hashtext($2))"
UNLOCK_SQL = "select pg_advisory_unlock($1, hashtext($2))"
CLEANUP_LOCK_TIMEOUT = "5s"
"""How long dropping a failed run's schemas waits for that run's own sessions to end."""
MAX_IDENTIFIER = 63
"""PostgreSQL cuts longer names short (NAMEDATALEN - 1), so two runs' names could meet."""


@dataclass(frozen=True, slots=True)
class ScratchSchemas:
    """One kind of run's schemas: `prefix` then `_`-joined parts, the lock (namespace, owner) holding each.

    `shape` matches what follows the prefix; its group `owner` names the lock: a rebuild's schema is
    `tally_rebuild_<projection>`, held by that projection's rebuild lock; an audit diff's is
    `tally_audit_<run>_<projection>`, all held by that run's lock."""

    prefix: str
    namespace: int
    shape: re.Pattern[str]
    run: str
    """What makes them, as a log line names it ("rebuild")."""

    def schema(self, *parts: str) -> str:
        name = self.prefix + "_".join(parts)
        if self.owner_of(name) is None or len(name.encode()) > MAX_IDENTIFIER:
            raise ValueError(f"not a {self.run} schema name: {name!r}")
        return name

    def owner_of(self, schema: str) -> str | None:
        found = self.shape.fullmatch(schema[len(self.prefix):]) if schema.startswith(self.prefix) else None
        return found["owner"] if found else None

    async def _present(self, db: Executor) -> dict[str, list[str]]:
        """owner -> its schemas present (only names of this shape: a run makes no other)."""
        owned: dict[str, list[str]] = {}
        for row in await db.fetch(SCHEMAS_SQL, self.prefix):
            if (owner := self.owner_of(row[0])) is not None:
                owned.setdefault(owner, []).append(row[0])
        return owned

    async def leftovers(self, db: Executor) -> list[str]:
        """The schemas no running run holds (read only: `projections status` reports them)."""
        owned = await self._present(db)
        running = await leader.holders(db, self.namespace, list(owned)) if owned else {}
        return [schema for owner, schemas in owned.items() if owner not in running for schema in schemas]

    async def drop_leftovers(self, conn: Connection) -> list[str]:
        """Drop every schema whose lock this session can take; the schemas dropped.

        Best effort: one the server refuses to drop (a lock someone holds on it past statement_timeout,
        another role's) is said in one line and left, since the run under way does not need it gone."""
        dropped = []
        for owner, schemas in (await self._present(conn)).items():
            if not await leader.try_lock(conn, self.namespace, owner):
                continue  # its run is still going: its schemas, not leftovers
            try:
                for schema in schemas:
                    try:
                        await conn.execute(f"drop schema if exists {schema} cascade")
                    except asyncpg.PostgresError as exc:
                        log.warning("could not drop schema %s, left by a %s that did not finish (%s)",
                                    schema, self.run, describe(exc))
                        continue
                    log.info("dropped schema %s, left by a %s that did not finish", schema, self.run)
                    dropped.append(schema)
            finally:
                await conn.fetchval(UNLOCK_SQL, self.namespace, owner)
        return dropped

    async def drop_after_failure(self, connect: Connect, schemas: Sequence[str]) -> None:
        """Drop a failed run's schemas on a fresh session (its own may be the one that was lost).

        Its sessions have been closed: each lock is taken (waiting for the server to end the old
        session) before its schemas are dropped, so a run that started meanwhile keeps its own. Best
        effort: what cannot be dropped is said in one line, and the next run drops it."""
        if not schemas:
            return
        left = list(schemas)
        try:
            conn = await connect(f"tally-{self.run}-cleanup")
        except Exception as exc:
            self._left_behind(left, exc)
            return
        try:
            await conn.execute(f"set lock_timeout = '{CLEANUP_LOCK_TIMEOUT}'")
            for owner in dict.fromkeys(owner for schema in schemas if (owner := self.owner_of(schema))):
                await conn.fetchval(LOCK_SQL, self.namespace, owner)
                for schema in [schema for schema in left if self.owner_of(schema) == owner]:
                    await conn.execute(f"drop schema if exists {schema} cascade")
                    left.remove(schema)
                await conn.fetchval(UNLOCK_SQL, self.namespace, owner)
        except Exception as exc:
            self._left_behind(left, exc)
        finally:
            conn.terminate()

    def _left_behind(self, schemas: list[str], exc: BaseException) -> None:
        log.warning("could not drop %s after the failed %s (%s); the next %s drops it",
                    ", ".join(schemas), self.run, describe(exc), self.run)
