"""Domain events to and from rows of the log, for whoever writes or folds them: the repository, the
wallet streams' figures, the auditors' replay, the projections.

Each event row carries the domain event's own time in data["occurred_at"] (inside the hash chain,
because replaying expiry depends on it) and its payload schema version in metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.domain import Aggregate

from backend.domain import registry
from backend.store.events import NewEvent, RecordedEvent

OCCURRED_AT = "occurred_at"


def to_new_event(event: Aggregate.Event, metadata: Mapping[str, Any]) -> NewEvent:
    name, data = registry.payload_from_event(event)
    data[OCCURRED_AT] = event.timestamp.isoformat()
    meta = {**metadata, "schema_version": registry.SCHEMA_VERSIONS[name]}
    return NewEvent(name, data, meta, uuid4())


def from_recorded(event: RecordedEvent, aggregate_id: UUID) -> registry.AnyEvent:
    data = dict(event.data)
    occurred_at = data.pop(OCCURRED_AT)
    return registry.event_from_payload(
        event.type, aggregate_id, event.version, occurred_at, data,
        schema_version=event.metadata.get("schema_version", 1),
    )


def fold(events: Sequence[RecordedEvent], aggregate: Aggregate | None, aggregate_id: UUID) -> Aggregate | None:
    mapped = [from_recorded(e, aggregate_id) for e in events]
    return registry.replay(mapped) if aggregate is None else registry.replay(mapped, aggregate)
