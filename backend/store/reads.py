"""Reading the log: one stream, the whole log (filtered), the head; paged iteration in constant memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TypeAlias

import asyncpg

from backend.db import Connection
from backend.store.events import RecordedEvent

COLUMNS = "position, stream_id, version, type, data, metadata, event_id, recorded_at, hash"
"""RecordedEvent's fields, in order: a row of exactly these is the event's arguments (`events_of`)."""

READ_STREAM_SQL = f"""
select {COLUMNS} from events
where stream_id = $1 and version > $2 and version <= $3
order by version limit $4
"""

HEAD_SQL = "select coalesce(max(position), 0) from events"

INT32_MAX = 2**31 - 1
DEFAULT_PAGE = 1000

Executor: TypeAlias = "asyncpg.Pool | Connection"


def to_event(row: asyncpg.Record) -> RecordedEvent:
    return RecordedEvent(
        position=row["position"],
        stream_id=row["stream_id"],
        version=row["version"],
        type=row["type"],
        data=row["data"],
        metadata=row["metadata"],
        event_id=row["event_id"],
        recorded_at=row["recorded_at"],
        hash=bytes(row["hash"]),
    )


def events_of(rows: list[asyncpg.Record]) -> list[RecordedEvent]:
    """Rows of COLUMNS alone, as events, positionally (bytea arrives as bytes): the log tail reads every
    event this way, and looking each column up by name cost more than building the event."""
    return [RecordedEvent(*row) for row in rows]


def read_all_query(
    after_position: int, limit: int, types: Sequence[str] | None, stream_prefix: str | None
) -> tuple[str, list[object]]:
    """One statement per filter shape, so each gets its own plan (no catch-all `$n is null or ...`)."""
    args: list[object] = [after_position, limit]
    where = ["position > $1"]
    if types is not None:
        args.append(list(types))
        where.append(f"type = any(${len(args)}::text[])")
    if stream_prefix is not None:
        args.append(stream_prefix)
        where.append(f"starts_with(stream_id, ${len(args)})")
    sql = f"select {COLUMNS} from events where {' and '.join(where)} order by position limit $2"
    return sql, args


async def read_stream(
    db: Executor, stream_id: str, after_version: int = 0, to_version: int | None = None, limit: int = INT32_MAX
) -> list[RecordedEvent]:
    return events_of(await db.fetch(READ_STREAM_SQL, stream_id, after_version, to_version or INT32_MAX, limit))


async def read_all(
    db: Executor,
    after_position: int = 0,
    limit: int = DEFAULT_PAGE,
    types: Sequence[str] | None = None,
    stream_prefix: str | None = None,
) -> list[RecordedEvent]:
    sql, args = read_all_query(after_position, limit, types, stream_prefix)
    return events_of(await db.fetch(sql, *args))


FOLLOWED_COLUMNS = COLUMNS.replace(
    "metadata", "jsonb_build_object('schema_version', coalesce(metadata->'schema_version', '1'::jsonb)) as metadata")
"""COLUMNS for the log tail's followers: of the metadata only the schema version (1 when unset), the one
key they use (projections and cached aggregates upcast by it; SSE frames never show metadata). The
whole metadata (actor, request and correlation ids) made every event's row larger to send, decode and
keep; the audit and export paths read it with COLUMNS."""

FOLLOWED_SQL = f"select {FOLLOWED_COLUMNS} from events where position > $1 order by position limit $2"


async def read_followed(db: Executor, after_position: int, limit: int) -> list[RecordedEvent]:
    """Up to limit events after a position, as the log tail hands them on (FOLLOWED_COLUMNS)."""
    return events_of(await db.fetch(FOLLOWED_SQL, after_position, limit))


READ_TYPES_TO_HEAD_SQL = f"""
select h.head, e.* from (select coalesce(max(position), 0) as head from events) as h
left join lateral (
    select {FOLLOWED_COLUMNS} from events where position > $1 and type = any($3::text[]) order by position limit $2
) as e on true
"""


async def read_types_to_head(db: Executor, after_position: int, limit: int,
                             types: Sequence[str]) -> tuple[list[RecordedEvent], int]:
    """Up to limit events of the given types after a position (FOLLOWED_COLUMNS: the log tail's read),
    and the head, in one round trip and one snapshot: when fewer than limit come back, every event up to
    the head has been examined (positions become visible in order)."""
    rows = await db.fetch(READ_TYPES_TO_HEAD_SQL, after_position, limit, list(types))
    head = int(rows[0]["head"])
    return ([] if rows[0]["position"] is None else [to_event(row) for row in rows]), head


async def iter_all(
    db: Executor,
    after_position: int = 0,
    types: Sequence[str] | None = None,
    stream_prefix: str | None = None,
    page_size: int = DEFAULT_PAGE,
    to_position: int | None = None,
) -> AsyncIterator[RecordedEvent]:
    """Every matching event after after_position (up to to_position), fetched page by page."""
    position = after_position
    while True:
        page = await read_all(db, position, page_size, types, stream_prefix)
        for event in page:
            if to_position is not None and event.position > to_position:
                return
            yield event
        if len(page) < page_size:
            return
        position = page[-1].position


async def iter_stream(
    db: Executor, stream_id: str, after_version: int = 0, to_version: int | None = None, page_size: int = DEFAULT_PAGE
) -> AsyncIterator[RecordedEvent]:
    version = after_version
    while True:
        page = await read_stream(db, stream_id, version, to_version, page_size)
        for event in page:
            yield event
        if len(page) < page_size:
            return
        version = page[-1].version


async def head(db: Executor) -> int:
    return int(await db.fetchval(HEAD_SQL))

