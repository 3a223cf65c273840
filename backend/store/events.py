"""The event store's vocabulary: what is appended, what is read back, and what can go wrong."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

ANY: Final = -1
"""Expected version: append whatever the stream's version is."""
NO_STREAM: Final = 0
"""Expected version: the stream must not exist yet."""

MAX_STREAM_ID_LENGTH: Final = 256
MAX_POSITION: Final = 2**63 - 1
"""Positions are bigint: no log reaches a position above this."""
MAX_TYPE_LENGTH: Final = 128


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. Give it a stable event_id to make re-appending it idempotent."""

    type: str
    data: Mapping[str, Any]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True, slots=True)
class Write:
    """Events for one stream, appended only if the stream is at expected_version (or ANY)."""

    stream_id: str
    expected_version: int
    events: Sequence[NewEvent]


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    position: int
    stream_id: str
    version: int
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    """As appended; in the events the log tail hands on, only {"schema_version": n} (backend/store/tail.py)."""
    event_id: uuid.UUID
    recorded_at: datetime
    hash: bytes


class UnreadableEvent(Exception):
    """The event at `position` holds a value the service cannot read for what it must be: a recorded_at
    of PostgreSQL's 'infinity' or '-infinity', which no append writes (only someone with access to the
    database can). A read that needs the value refuses; `audit verify` reports the event as changed."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"the event at position {position} cannot be read: {reason}")
        self.position = position
        self.reason = reason


def recorded_time(position: int, recorded_at: datetime) -> datetime:
    """recorded_at as a time to compare or view at, else UnreadableEvent: asyncpg reads an infinite
    timestamptz as a naive datetime.max or .min, while every time an append records is aware (UTC)."""
    if recorded_at.tzinfo is None:
        raise UnreadableEvent(position, "its recorded_at is infinite")
    return recorded_at


@dataclass(frozen=True, slots=True)
class StreamAppended:
    stream_id: str
    positions: tuple[int, ...]
    version: int
    """The stream's version after this write."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    streams: tuple[StreamAppended, ...]
    replayed: bool = False
    """True when every event was already stored (an idempotent re-append): nothing was written."""

    @property
    def position(self) -> int:
        """The highest position of the call: read-your-writes waits for this."""
        streams = self.streams
        if len(streams) == 1:  # most calls: no generator
            positions = streams[0].positions
            return max(positions) if positions else 0
        return max((max(s.positions) for s in streams if s.positions), default=0)


class StoreError(Exception):
    pass


class InvalidEvent(StoreError, ValueError):
    """The append request itself is malformed; nothing was stored."""


class WrongExpectedVersion(StoreError):
    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id!r} is at version {actual}, expected {expected}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class PredecessorFailed(WrongExpectedVersion):
    """The append was decided on the state left by an earlier append of this process that was still in
    flight, and that one did not commit. Its expected version proves nothing then (another writer may
    have reached that version with different events), so it fails as if stale: decide again."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(stream_id, expected, actual)
        self.args = (f"stream {stream_id!r}: the append expecting version {expected} was decided after an "
                     "append that did not commit",)


class DuplicateEventId(StoreError):
    def __init__(self, event_id: uuid.UUID, detail: str) -> None:
        super().__init__(f"event {event_id} is already stored {detail}")
        self.event_id = event_id
