"""What a projection sees of an event is the same whether the runner read it itself (`_events` over
read_batch's rows) or the feed lifted the log tail's whole event (`from_recorded`), upcasting included."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from backend.domain import registry
from backend.store.events import RecordedEvent
from projections.events import _events, from_recorded

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def recorded(position: int, kind: str, data: dict[str, Any], metadata: dict[str, Any]) -> RecordedEvent:
    return RecordedEvent(position, "wallet-x", position, kind, data, metadata, uuid.uuid4(), T0, bytes(32))


def test_from_recorded_gives_what_a_read_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    def v0_to_v1(data: dict[str, Any]) -> dict[str, Any]:
        return {"amount": data.pop("amount_minor"), "reference": data.pop("memo", "")}

    monkeypatch.setitem(registry.UPCASTERS, ("WalletCredited", 0), v0_to_v1)
    occurred_at = T0.isoformat()
    events = [
        recorded(1, "WalletOpened", {"owner": "a", "currency": "USD", "occurred_at": occurred_at}, {}),
        recorded(2, "WalletCredited", {"amount_minor": 250, "occurred_at": occurred_at}, {"schema_version": 0}),
        recorded(3, "WalletCredited", {"amount": 5, "reference": "r", "occurred_at": occurred_at},
                 {"schema_version": 1, "actor": "t"}),
        recorded(4, "SomethingElse", {"x": 1}, {"schema_version": "7"}),  # a type without schema versions
    ]
    rows = [(e.position, e.stream_id, e.version, e.type, e.data, e.recorded_at,
             int(e.metadata.get("schema_version", 1))) for e in events]
    lifted = from_recorded(events)
    assert lifted == _events(rows)
    assert lifted[1].data == {"amount": 250, "reference": "", "occurred_at": occurred_at}
    assert events[1].data == {"amount_minor": 250, "occurred_at": occurred_at}, "the stored payload is not mutated"
