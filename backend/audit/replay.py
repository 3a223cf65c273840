"""One stream's history for a reader: each event, then the aggregate's state right after it.

The state is folded from the events alone (no cache, no snapshot), the way time travel does. A
wallet shows its view at the event's recorded time (reservations due by then count as expired);
other aggregates show their public attributes; a stream that is no aggregate shows events only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.domain import Aggregate

from backend.db import Connection
from backend.domain import ValidationError, Wallet, parse_stream_id
from backend.store.event_codec import fold
from backend.store.events import RecordedEvent, recorded_time
from backend.store.hashing import format_time
from backend.store.reads import iter_stream


class ReplayError(Exception):
    """An event could not be applied: the stream does not replay (itself worth an auditor's attention)."""


@dataclass(frozen=True, slots=True)
class Step:
    event: dict[str, Any]
    state: dict[str, Any] | None


def event_dict(event: RecordedEvent) -> dict[str, Any]:
    return {
        "position": event.position,
        "stream_id": event.stream_id,
        "version": event.version,
        "type": event.type,
        "data": event.data,
        "metadata": event.metadata,
        "event_id": str(event.event_id),
        "recorded_at": format_time(recorded_time(event.position, event.recorded_at)),
        "hash": event.hash.hex(),
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def state_of(aggregate: Aggregate, at: datetime) -> dict[str, Any]:
    """JSON-ready state: a wallet's view at `at`, else the aggregate's public attributes."""
    if isinstance(aggregate, Wallet):
        return aggregate.view(at).as_dict()
    public = {k: v for k, v in vars(aggregate).items() if not k.startswith("_")}
    state = {"id": aggregate.id, **public, "version": aggregate.version}
    result: dict[str, Any] = orjson.loads(orjson.dumps(state, default=_json_default))
    return result


def aggregate_id_of(stream_id: str) -> UUID | None:
    try:
        return parse_stream_id(stream_id)[1]
    except ValidationError:
        return None


async def replay_stream(conn: Connection, stream_id: str, to_position: int | None = None) -> AsyncIterator[Step]:
    aggregate_id = aggregate_id_of(stream_id)
    aggregate: Aggregate | None = None
    async for event in iter_stream(conn, stream_id):
        if to_position is not None and event.position > to_position:
            return
        state = None
        if aggregate_id is not None:
            try:
                aggregate = fold([event], aggregate, aggregate_id)
            except Exception as exc:
                raise ReplayError(f"{stream_id} v{event.version} (position {event.position}) does not apply: "
                                  f"{type(exc).__name__}: {exc}") from exc
            at = recorded_time(event.position, event.recorded_at)
            state = state_of(aggregate, at) if aggregate is not None else None
        yield Step(event_dict(event), state)
