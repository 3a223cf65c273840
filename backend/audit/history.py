"""Pages of history for auditors: the global log (filtered by type, stream prefix and recorded time)
and one stream's events, with cursors that stay valid while appends continue.

Positions become visible strictly in order and never change, so "everything after position P" is a
stable cursor. A page is read in one repeatable-read snapshot together with the head, so when it holds
the last matching event of that snapshot its `next` cursor can safely skip to the head: nothing at or
below it can appear later. `has_more` says whether the snapshot held more (one row more is read).

Time filters are turned into position bounds: recorded_at never goes backwards along the log, so the
events recorded before a time T are exactly the positions up to the last one recorded before T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from backend.audit.export import EXPORT_COLUMNS, event_json
from backend.audit.verify import head as log_head
from backend.db import Connection
from backend.store.events import recorded_time

# Walks events_recorded_at backwards and sorts only the first group of equal times (one append
# batch shares a recorded_at): an incremental sort, not a scan, however old $1 is.
POSITION_BEFORE_SQL = """
select coalesce(
    (select position from events where recorded_at < $1 order by recorded_at desc, position desc limit 1), 0)
"""
STREAM_PAGE_SQL = f"""
select {EXPORT_COLUMNS} from events where stream_id = $1 and version > $2 order by version limit $3
"""
STREAM_VERSION_SQL = "select max(version) from events where stream_id = $1"
RECORDED_AT_SQL = "select position, recorded_at from events where position <= $1 order by position desc limit 1"
# An infinite time (tampering: no append writes one) is no time at all; it is not the newest.
NEWEST_RECORDED_SQL = "select max(recorded_at) from events where isfinite(recorded_at)"


@dataclass(frozen=True, slots=True)
class Page:
    events: list[bytes]
    """Each event as JSON (backend.audit.export.event_json)."""
    next: int
    """The cursor for the following page: a position (log) or a version (stream)."""
    has_more: bool
    head: int = 0


def page_query(
    low: int, high: int, limit: int, types: Sequence[str] | None, stream_prefix: str | None
) -> tuple[str, list[object]]:
    """One statement per filter shape, so each gets its own plan."""
    args: list[object] = [low, high, limit]
    where = ["position > $1", "position <= $2"]
    if types:
        args.append(list(types))
        where.append(f"type = any(${len(args)}::text[])")
    if stream_prefix:
        args.append(stream_prefix)
        where.append(f"starts_with(stream_id, ${len(args)})")
    return f"select {EXPORT_COLUMNS} from events where {' and '.join(where)} order by position limit $3", args


async def position_before(conn: Connection, moment: datetime) -> int:
    """The last position recorded strictly before `moment` (0 if none)."""
    return int(await conn.fetchval(POSITION_BEFORE_SQL, moment))


async def recorded_at(conn: Connection, position: int) -> datetime | None:
    """The recorded time of the event at `position`, or of the last one below it (None if none is);
    UnreadableEvent if that time is infinite."""
    row = await conn.fetchrow(RECORDED_AT_SQL, position)
    return recorded_time(row["position"], row["recorded_at"]) if row is not None else None


async def newest_recorded(conn: Connection) -> datetime | None:
    """The recorded time of the log's newest event (None for an empty log)."""
    moment: datetime | None = await conn.fetchval(NEWEST_RECORDED_SQL)
    return moment


async def log_page(
    conn: Connection,
    *,
    after: int,
    limit: int,
    types: Sequence[str] | None = None,
    stream_prefix: str | None = None,
    from_time: datetime | None = None,
    to_time: datetime | None = None,
) -> Page:
    """Events after `after` matching every filter, recorded in [from_time, to_time), oldest first."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        head = await log_head(conn)
        low = max(after, await position_before(conn, from_time)) if from_time is not None else after
        high = min(head, await position_before(conn, to_time)) if to_time is not None else head
        sql, args = page_query(low, high, limit + 1, types, stream_prefix)  # one more: is there more?
        rows = await conn.fetch(sql, *args) if low < high else []
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = rows[-1][0] if more else max(low, high)
    return Page([event_json(row) for row in rows], cursor, more, head)


@dataclass(frozen=True, slots=True)
class BeyondStream:
    """A cursor past the stream's last version: never a next_cursor, and a page after it would skip
    the versions up to it once they are appended."""

    last: int


async def stream_page(
    conn: Connection, stream_id: str, *, after_version: int, limit: int
) -> Page | BeyondStream | None:
    """One stream's events after a version; None if the stream has no events at all."""
    rows = await conn.fetch(STREAM_PAGE_SQL, stream_id, after_version, limit + 1)  # one more: is there more?
    if not rows:
        last = await conn.fetchval(STREAM_VERSION_SQL, stream_id)
        if last is None:
            return None
        if after_version > last:
            return BeyondStream(last)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = rows[-1][2] if rows else after_version
    return Page([event_json(row) for row in rows], cursor, more)
