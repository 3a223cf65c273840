"""What a projection sees of the log, and the read that fetches it.

A projection needs each event's position, stream, version, type, payload and recorded time, with the
payload at its current schema version. It does not need the metadata, the hash or the event id:
leaving those out (and reading only the schema version out of the metadata) makes a batch cost far
less client CPU than `backend.store.reads.read_all` (see docs/PERFORMANCE.md), and that decides how
fast a rebuild goes.
The filter and order are read_all's (so are the indexes it uses).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from backend.db import Connection
from backend.domain.registry import SCHEMA_VERSIONS, upcast
from backend.store.event_codec import OCCURRED_AT
from backend.store.events import RecordedEvent

_COLUMNS = """position, stream_id, version, type, data, recorded_at,
              coalesce((metadata->>'schema_version')::int, 1) as schema_version"""
READ_SQL = f"select {_COLUMNS} from events where position > $1 order by position limit $2"
READ_TYPES_SQL = f"""
select {_COLUMNS} from events where position > $1 and type = any($3::text[]) order by position limit $2
"""
_WITH_HEAD = """
select h.head, e.* from (select coalesce(max(position), 0) as head from events) as h
left join lateral ({}) as e on true
"""
READ_TO_HEAD_SQL = _WITH_HEAD.format(READ_SQL)
READ_TYPES_TO_HEAD_SQL = _WITH_HEAD.format(READ_TYPES_SQL)


@dataclass(frozen=True, slots=True)
class Event:
    position: int
    stream_id: str
    version: int
    type: str
    data: dict[str, Any]
    """At the current schema version of its type (upcast on read when stored older)."""
    recorded_at: datetime


async def read_batch(conn: Connection, after: int, limit: int, types: Sequence[str] | None = None) -> list[Event]:
    """Up to limit events after position `after` (of the given types), in log order."""
    rows = await (conn.fetch(READ_SQL, after, limit) if types is None else
                  conn.fetch(READ_TYPES_SQL, after, limit, list(types)))
    return _events(rows)


async def read_to_head(conn: Connection, after: int, limit: int,
                       types: Sequence[str] | None = None) -> tuple[list[Event], int]:
    """read_batch and the log's head, in one round trip and one snapshot: when fewer than limit events
    come back, every event up to the head has been examined (positions become visible in order)."""
    rows = await (conn.fetch(READ_TO_HEAD_SQL, after, limit) if types is None else
                  conn.fetch(READ_TYPES_TO_HEAD_SQL, after, limit, list(types)))
    head = int(rows[0][0])
    return ([] if rows[0][1] is None else _events(row[1:] for row in rows)), head


def _events(rows: Iterable[Any]) -> list[Event]:
    events = []
    for position, stream_id, version, kind, stored, recorded_at, schema_version in rows:
        events.append(Event(position, stream_id, version, kind, _current(kind, schema_version, stored), recorded_at))
    return events


def from_recorded(events: Iterable[RecordedEvent]) -> list[Event]:
    """Whole events (the log tail's reads) as a projection sees them: what read_batch gives (one loop, no
    generator of rows: the feed lifts every event the process hears of)."""
    lifted = []
    for e in events:
        stored = e.metadata.get("schema_version")
        schema_version = 1 if stored is None else int(stored)  # as READ_SQL's coalesce(..., 1)
        lifted.append(Event(e.position, e.stream_id, e.version, e.type, _current(e.type, schema_version, e.data),
                            e.recorded_at))
    return lifted


def _current(kind: str, schema_version: int, data: dict[str, Any]) -> dict[str, Any]:
    """The data at its type's latest schema version (as stored when it already is)."""
    latest = SCHEMA_VERSIONS.get(kind)
    return data if latest is None or schema_version == latest else _lift(kind, schema_version, data)


def _lift(kind: str, schema_version: int, data: dict[str, Any]) -> dict[str, Any]:
    payload = dict(data)
    occurred_at = payload.pop(OCCURRED_AT, None)
    lifted = upcast(kind, schema_version, payload)[1]
    lifted[OCCURRED_AT] = occurred_at
    return lifted
