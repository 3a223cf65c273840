"""Rebuild: replay the whole log into fresh copies of a projection's tables, then swap them in.

Each projection gets a schema `tally_rebuild_<name>` holding empty copies of its tables
(`like ... including all`: same columns, constraints, indexes and index names) and a connection
whose search_path puts that schema first, so its unchanged `apply` writes the copies. The log is
read once, in big batches, and every batch is applied to all the projections being rebuilt at the
same time, each on its own connection.

When the copies have caught up, one transaction per projection locks its checkpoint row (a live
runner's next batch waits on it), applies the last few events, drops the live tables, moves the
copies into their place and sets the checkpoint to where the copies are. Readers see the old
tables until that commit and the new ones after it, never a half-built model; the live runner then
finds its checkpoint moved (its fence) and continues from the new one.

Only one rebuild per projection runs at a time: it takes every projection's rebuild lock (a session
advisory lock) before it makes any schema, and is refused, having changed nothing, when another
rebuild holds one (AlreadyRebuilding). A rebuild that fails drops its schemas on a fresh session,
since its own may be the one that was lost (projections/scratch_schemas.py); one that dies leaves
them, and the next rebuild, of whichever projections, drops every schema whose lock is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from backend.db import Connection, describe
from backend.store import reads
from projections import checkpoints, leader
from projections.base import Projection
from projections.events import Event, read_batch
from projections.leader import Connect
from projections.runner import analyze
from projections.scratch_schemas import ScratchSchemas

log = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")

SCHEMAS = ScratchSchemas("tally_rebuild_", leader.REBUILD, re.compile(r"(?P<owner>[a-z_][a-z0-9_]{0,40})"),
                         "rebuild")
"""`tally_rebuild_<projection>`, held by that projection's rebuild lock."""

Report = Callable[[int, int], None]
"""Progress callback: (events replayed so far, head of the log when the replay started)."""


class RebuildError(Exception):
    pass


class AlreadyRebuilding(RebuildError):
    """Another rebuild holds the lock of a projection named: refused before anything was changed."""


@dataclass(frozen=True, slots=True)
class RebuildResult:
    names: tuple[str, ...]
    events: int
    """Events read from the log (every projection got the ones it handles)."""
    seconds: float
    checkpoints: dict[str, int]

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class _Target:
    """One projection being rebuilt: its connection, set up to write the copies of its tables."""

    def __init__(self, projection: Projection, conn: asyncpg.Connection[asyncpg.Record], home: str) -> None:
        self.projection = projection
        self.conn = conn
        self.home = home
        self.locked = False
        """Whether this rebuild holds the projection's rebuild lock (and so owns the schema)."""
        for name in (projection.name, *projection.tables, home):
            if not _IDENTIFIER.match(name):
                raise RebuildError(f"not a plain identifier: {name!r}")
        self.schema = SCHEMAS.schema(projection.name)

    async def lock(self) -> bool:
        self.locked = await leader.try_lock(self.conn, leader.REBUILD, self.projection.name)
        return self.locked

    async def prepare(self) -> None:
        """Make the schema afresh (a dead rebuild's may be there) and point the connection at it."""
        conn = self.conn
        await conn.execute("set statement_timeout = 0; set synchronous_commit = off")
        await conn.execute(f"drop schema if exists {self.schema} cascade; create schema {self.schema}")
        for table in self.projection.tables:
            await conn.execute(f"create unlogged table {self.schema}.{table} (like {self.home}.{table} including all)")
        await conn.execute(f"set search_path = {self.schema}, {self.home}")
        await checkpoints.load(conn, self.projection.name)  # make sure the row exists to lock it

    async def apply(self, events: Sequence[Event]) -> None:
        types = self.projection.types
        mine = events if types is None else [e for e in events if e.type in types]
        if not mine:
            return
        try:
            async with self.conn.transaction():
                await self.projection.apply(self.conn, mine)
        except Exception as exc:
            raise RebuildError(f"{self.projection.name} cannot apply the events at positions "
                               f"{mine[0].position}..{mine[-1].position}: {describe(exc)}") from exc

    async def analyze(self) -> None:
        """Fresh tables have no statistics; without them a big one can get a sequential-scan plan."""
        await analyze(self.conn, self.projection.tables, self.schema)

    async def swap(self, position: int, batch_size: int) -> int:
        """Catch up from position and swap the copies in, in one transaction; return the checkpoint."""
        conn, name = self.conn, self.projection.name
        types = sorted(self.projection.types) if self.projection.types is not None else None
        async with conn.transaction():
            await conn.execute("set local synchronous_commit = on")
            await conn.fetchval(checkpoints.FENCE_SQL, name)  # lock the row: the live runner waits
            while True:
                head = await reads.head(conn)
                tail = await read_batch(conn, position, batch_size, types)
                if tail:
                    await self.projection.apply(conn, tail)
                    position = tail[-1].position
                if len(tail) < batch_size:
                    position = max(position, head)
                    break
            for table in self.projection.tables:
                await conn.execute(f"alter table {self.schema}.{table} set logged")
                await conn.execute(f"drop table {self.home}.{table}")
                await conn.execute(f"alter table {self.schema}.{table} set schema {self.home}")
            await conn.execute(f"drop schema {self.schema}")
            await checkpoints.advance(conn, name, position)
        return position


async def rebuild(
    connect: Connect,
    projections: Sequence[Projection],
    *,
    batch_size: int = 20_000,
    report: Report | None = None,
) -> RebuildResult:
    """Rebuild the given projections together from position 0; see the module docstring."""
    if not projections:
        raise RebuildError("nothing to rebuild")
    started = time.monotonic()
    reader = await connect("tally-rebuild-reader")
    targets: list[_Target] = []
    try:
        home = str(await reader.fetchval("select current_schema()"))
        for projection in projections:
            targets.append(_Target(projection, await connect(f"tally-rebuild-{projection.name}"), home))
        busy = [target.projection.name for target in targets if not await target.lock()]
        if busy:
            raise AlreadyRebuilding(f"already being rebuilt: {', '.join(busy)}; nothing was changed")
        await SCHEMAS.drop_leftovers(reader)  # of any projection's dead rebuild; ours are locked
        await reader.execute("set statement_timeout = 0")
        for target in targets:
            await target.prepare()
        types = _union_of_types(projections)
        head = await reads.head(reader)
        position, count = await _replay(reader, targets, types, batch_size, head, report)
        done = {}
        for target in targets:
            await target.analyze()
            done[target.projection.name] = await target.swap(position, batch_size)
            log.info("projection rebuilt", extra={"projection": target.projection.name,
                                                   "checkpoint": done[target.projection.name]})
    except AlreadyRebuilding:
        raise  # nothing of ours to drop
    except BaseException as exc:
        if isinstance(exc, Exception):
            log.error("rebuild failed", extra={"error": describe(exc)})
        owned = [target.schema for target in targets if target.locked]
        for target in targets:
            target.conn.terminate()  # the session may be lost or mid-operation: drop the copies on a fresh one
        targets = []
        await SCHEMAS.drop_after_failure(connect, owned)
        raise
    finally:
        reader.terminate()
        for target in targets:
            target.conn.terminate()
    return RebuildResult(tuple(p.name for p in projections), count, time.monotonic() - started, done)


async def _replay(
    reader: Connection,
    targets: Sequence[_Target],
    types: list[str] | None,
    batch_size: int,
    head: int,
    report: Report | None,
) -> tuple[int, int]:
    """Read the log once, applying each batch to every target while the next batch is read.

    The copies are analyzed after batches 4, 8, 16, ...: statistics within a factor of two of the
    tables' size, for a logarithmic number of ANALYZEs (and once more before the swap)."""
    position = count = batches = 0
    events = await read_batch(reader, 0, batch_size, types)
    while events:
        full = len(events) == batch_size
        next_read = asyncio.ensure_future(read_batch(reader, events[-1].position, batch_size, types)) \
            if full else None
        try:
            await asyncio.gather(*(target.apply(events) for target in targets))
        except BaseException:
            if next_read is not None:
                next_read.cancel()
                with contextlib.suppress(BaseException):
                    await next_read
            raise
        position = events[-1].position
        count += len(events)
        batches += 1
        if batches >= 4 and batches & (batches - 1) == 0:
            await asyncio.gather(*(target.analyze() for target in targets))
        if report is not None:
            report(count, head)
        events = await next_read if next_read is not None else []
    return position, count


def _union_of_types(projections: Sequence[Projection]) -> list[str] | None:
    if any(p.types is None for p in projections):
        return None
    return sorted({t for p in projections for t in p.types or ()})
