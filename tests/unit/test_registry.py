"""Stable names, stream ids, payload mapping, upcasting and replay."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.domain import Aggregate, CanInitAggregate

from backend.domain import registry
from backend.domain.api_key import ApiKey, hash_secret
from backend.domain.deposit import Deposit
from backend.domain.errors import ValidationError
from backend.domain.wallet import Wallet

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def every_event_type() -> list[tuple[Aggregate, list[registry.AnyEvent]]]:
    """Aggregates with their full histories, together covering every registered event type."""
    a = Wallet.open(uuid4(), "alice", "USD", T0)
    b = Wallet.open(uuid4(), "bob", "USD", T0)
    a.credit(1000, "seed", at(1))
    a.debit(10, "fee", at(2))
    lock1, lock2 = uuid4(), uuid4()
    a.lock(lock1, 100, "order", at(3))
    a.lock(lock2, 50, "order", at(3))
    a.release(lock1, at(4))
    a.settle(lock2, b, at(5))
    r1, r2, r3 = uuid4(), uuid4(), uuid4()
    a.reserve(r1, 10, at(60), at(6))
    a.reserve(r2, 20, at(60), at(6))
    a.reserve(r3, 30, at(7), at(6))
    a.confirm(r1, at(8), amount=4)  # also expires r3
    a.rollback(r2, at(9))
    a.credit_from_deposit(uuid4(), 77, "tx-1", at(10))

    deposit_id = uuid4()
    d1 = Deposit.create(deposit_id, a.id, "BTC", "tb1qexample", T0)
    d1.mark_confirming(1, at(1))
    d1.mark_pending(0, at(2))
    d1.mark_confirming(2, at(3))
    d1.confirm(5000, "tx-2", 6, at(4))
    d2 = Deposit.create(uuid4(), a.id, "USD", "TLY00", T0)
    d2.fail("rejected", at(1))
    d3 = Deposit.create(uuid4(), a.id, "ETH", "0x00", T0)
    d3.expire(at(1))

    k = ApiKey.create(uuid4(), "alice", "ci", ["admin"], hash_secret("s"), at(3600), T0)
    k.revoke(at(5))
    return [(agg, list(agg.collect_events())) for agg in (a, b, d1, d2, d3, k)]


def to_row(event: registry.AnyEvent) -> tuple[str, int, str, str, str]:
    """What a store would write: stream id, version, type, JSON data, timestamp."""
    name, data = registry.payload_from_event(event)
    return (
        f"{registry.aggregate_type_of(name)}-{event.originator_id}",
        event.originator_version,
        name,
        json.dumps(data),
        event.timestamp.isoformat(),
    )


def from_row(row: tuple[str, int, str, str, str]) -> registry.AnyEvent:
    stream, version, name, data, timestamp = row
    _, originator_id = registry.parse_stream_id(stream)
    return registry.event_from_payload(name, originator_id, version, timestamp, json.loads(data))


# ---------------------------------------------------------------- names


def test_every_event_class_is_registered_under_its_own_name() -> None:
    declared = set()
    for aggregate_class in registry.AGGREGATE_TYPES.values():
        for name, value in vars(aggregate_class).items():
            is_event = isinstance(value, type) and issubclass(value, aggregate_class.Event)
            # 'Event' is the abstract base; 'Created' is eventsourcing's unused default.
            if is_event and name not in {"Event", "Created"}:
                declared.add(value)
    assert declared == set(registry.EVENT_TYPES.values())
    for name, cls in registry.EVENT_TYPES.items():
        assert cls.__name__ == name
        assert registry.type_name(cls) == name
        assert "." not in name and ":" not in name


def test_type_name_of_instance_and_unknown() -> None:
    w = Wallet.open(uuid4(), "a", "USD", T0)
    assert registry.type_name(w.collect_events()[0]) == "WalletOpened"
    with pytest.raises(KeyError):
        registry.type_name(Wallet.Created)
    with pytest.raises(KeyError):
        registry.event_class("WalletExploded")


def test_schema_versions_start_at_one() -> None:
    assert registry.SCHEMA_VERSIONS == dict.fromkeys(registry.EVENT_TYPES, 1)


def test_each_event_type_belongs_to_one_aggregate() -> None:
    assert registry.aggregate_type_of("WalletDebited") == "wallet"
    assert registry.aggregate_type_of("DepositConfirmed") == "deposit"
    assert registry.aggregate_type_of("ApiKeyRevoked") == "apikey"


def test_event_fields_are_json_friendly_types() -> None:
    allowed = {int, str, bool, UUID, datetime, tuple[str, ...], datetime | None}
    for name, cls in registry.EVENT_TYPES.items():
        fields = registry.event_fields(cls)
        assert not fields.keys() & registry.ENVELOPE, name
        assert set(fields.values()) <= allowed, (name, fields)


# ---------------------------------------------------------------- streams


def test_stream_ids() -> None:
    wallet_id = uuid4()
    assert registry.wallet_stream(wallet_id) == f"wallet-{wallet_id}"
    assert registry.deposit_stream(wallet_id) == f"deposit-{wallet_id}"
    assert registry.apikey_stream(wallet_id) == f"apikey-{wallet_id}"
    assert registry.parse_stream_id(f"wallet-{wallet_id}") == ("wallet", wallet_id)
    assert registry.aggregate_for_stream(f"deposit-{wallet_id}") is Deposit
    assert registry.aggregate_for_stream(f"apikey-{wallet_id}") is ApiKey
    w = Wallet.open(wallet_id, "a", "USD", T0)
    assert registry.stream_id(w) == registry.wallet_stream(wallet_id)
    d = Deposit.create(uuid4(), wallet_id, "BTC", "tb1q", T0)
    assert registry.stream_id(d) == registry.deposit_stream(d.id)


@pytest.mark.parametrize(
    "bad",
    [
        "wallet",
        "wallet-",
        "wallet-not-a-uuid",
        "account-12345678-1234-5678-1234-567812345678",
        "wallet-12345678-1234-5678-1234-56781234567A",  # not canonical (upper case)
        "wallet-{12345678-1234-5678-1234-567812345678}",
        "wallet-123456781234567812345678123456781",
        "Wallet-12345678-1234-5678-1234-567812345678",
        "",
    ],
)
def test_invalid_stream_ids(bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        registry.parse_stream_id(bad)
    assert info.value.field == "stream_id"


def test_stream_for_unknown_category() -> None:
    with pytest.raises(KeyError):
        registry.stream_for("account", uuid4())
    with pytest.raises(TypeError):
        registry.stream_for("wallet", "x")


# ---------------------------------------------------------------- payloads


def test_every_event_type_round_trips() -> None:
    seen = set()
    for _, events in every_event_type():
        for event in events:
            name, data = registry.payload_from_event(event)
            seen.add(name)
            assert not data.keys() & registry.ENVELOPE
            assert json.loads(json.dumps(data)) == data  # JSON-friendly as it is
            assert from_row(to_row(event)) == event
    assert seen == set(registry.EVENT_TYPES)


def test_payload_encoding() -> None:
    w = Wallet.open(uuid4(), "a", "USD", T0)
    w.credit(100, "r", T0)
    rid = uuid4()
    w.reserve(rid, 10, datetime(2024, 5, 1, 14, 0, tzinfo=UTC), T0)
    name, data = registry.payload_from_event(w.collect_events()[-1])
    assert name == "CreditReserved"
    assert data == {
        "reservation_id": str(rid),
        "amount": 10,
        "expires_at": "2024-05-01T14:00:00+00:00",
    }


def test_created_event_gets_its_topic_back() -> None:
    w = Wallet.open(uuid4(), "a", "USD", T0)
    [event] = w.collect_events()
    name, data = registry.payload_from_event(event)
    assert "originator_topic" not in data
    rebuilt = registry.event_from_payload(name, str(w.id), 1, "2024-05-01T12:00:00Z", data)
    assert isinstance(rebuilt, CanInitAggregate)
    assert rebuilt == event
    assert rebuilt.timestamp == T0


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"amount": 5}, ValueError),  # missing reference
        ({"amount": 5, "reference": "r", "extra": 1}, ValueError),
        ({"amount": "5", "reference": "r"}, TypeError),
        ({"amount": True, "reference": "r"}, TypeError),
        ({"amount": 5.0, "reference": "r"}, TypeError),
        ({"amount": 5, "reference": None}, TypeError),
    ],
)
def test_event_from_payload_rejects_bad_payloads(data: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        registry.event_from_payload("WalletCredited", uuid4(), 2, T0, data)


def test_event_from_payload_rejects_naive_time_and_bad_ids() -> None:
    data = {"amount": 5, "reference": "r"}
    with pytest.raises(ValueError, match="naive"):
        registry.event_from_payload("WalletCredited", uuid4(), 2, "2024-05-01T12:00:00", data)
    with pytest.raises(ValueError):
        registry.event_from_payload("WalletCredited", "nope", 2, T0, data)


def test_payload_from_event_rejects_unregistered_events() -> None:
    stray = Wallet.Created(originator_id=uuid4(), originator_version=1, timestamp=T0, originator_topic="x")
    with pytest.raises(KeyError):
        registry.payload_from_event(stray)


# ---------------------------------------------------------------- upcasting


def test_upcaster_lifts_a_v0_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    """A made-up v0 WalletCredited stored ``amount_minor`` and had no reference."""

    def v0_to_v1(data: dict[str, Any]) -> dict[str, Any]:
        return {"amount": data.pop("amount_minor"), "reference": data.pop("memo", "")}

    monkeypatch.setitem(registry.UPCASTERS, ("WalletCredited", 0), v0_to_v1)
    old = {"amount_minor": 250}
    assert registry.upcast("WalletCredited", 0, old) == (1, {"amount": 250, "reference": ""})
    assert old == {"amount_minor": 250}  # the stored payload is not mutated
    assert registry.upcast("WalletCredited", 1, {"amount": 1, "reference": "x"}) == (
        1,
        {"amount": 1, "reference": "x"},
    )

    wallet_id = uuid4()
    opened = registry.event_from_payload("WalletOpened", wallet_id, 1, T0, {"owner": "a", "currency": "USD"})
    credited = registry.event_from_payload("WalletCredited", wallet_id, 2, T0, old, schema_version=0)
    w = registry.replay([opened, credited])
    assert isinstance(w, Wallet)
    assert w.balance == 250


def test_upcast_without_upcaster_or_from_the_future() -> None:
    with pytest.raises(LookupError):
        registry.upcast("WalletCredited", 0, {"amount_minor": 1})
    with pytest.raises(ValueError, match="newer"):
        registry.upcast("WalletCredited", 2, {})
    with pytest.raises(KeyError):
        registry.upcast("WalletExploded", 1, {})


# ---------------------------------------------------------------- replay


def test_replaying_mapped_rows_rebuilds_identical_aggregates() -> None:
    for aggregate, events in every_event_type():
        rows = [to_row(e) for e in events]
        rebuilt = registry.replay(from_row(row) for row in rows)
        assert rebuilt == aggregate
        assert rebuilt is not None and rebuilt.version == len(events)
        assert rebuilt.modified_on == events[-1].timestamp


def test_replay_continues_from_an_aggregate() -> None:
    aggregate, events = every_event_type()[0]
    head = registry.replay(events[:3])
    assert head is not None
    assert registry.replay(events[3:], head) == aggregate


def test_replay_state_as_of_a_version() -> None:
    (aggregate, events) = every_event_type()[0]
    assert isinstance(aggregate, Wallet)
    early = registry.replay(events[:2])
    assert isinstance(early, Wallet)
    assert (early.balance, early.version) == (1000, 2)
