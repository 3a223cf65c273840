"""Stable names for streams, aggregates and events, and the event <-> row payload mapping.

Nothing here stores a Python module path. A mapper writes an event as::

    type_name, data = payload_from_event(event)     # data is JSON-friendly
    row: stream_id(aggregate), event.originator_version, type_name, data,
         metadata["schema_version"] = SCHEMA_VERSIONS[type_name], event.timestamp

and rebuilds it with ``event_from_payload(type_name, originator_id, version, timestamp, data,
schema_version=...)``, which upcasts old payloads, turns strings back into ``UUID`` and
``datetime`` by the event class's field annotations, and, for a "created" event, supplies
``originator_topic`` from ``AGGREGATE_TYPES`` (eventsourcing needs it to build the aggregate).
``timestamp`` must be the event's own ``timestamp`` (the command's ``now``) for a replay to
reproduce ``modified_on`` exactly. ``replay(events)`` folds events into an aggregate.

Note: ``typing.get_type_hints`` on an event class reports ``originator_id`` as a TypeVar
(eventsourcing's generics); use ``event_fields`` for the payload fields instead.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints, overload
from uuid import UUID

from eventsourcing.domain import Aggregate, CanInitAggregate, CanMutateAggregate
from eventsourcing.utils import get_topic

from .api_key import ApiKey
from .deposit import Deposit
from .errors import ValidationError
from .wallet import Wallet

A = TypeVar("A", bound=Aggregate)
# What ``collect_events()`` returns; every registered event is an ``Aggregate.Event``.
AnyEvent = CanMutateAggregate[UUID]
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

# Stream category (the prefix of a stream id) -> aggregate class.
AGGREGATE_TYPES: Mapping[str, type[Aggregate]] = types.MappingProxyType(
    {"wallet": Wallet, "deposit": Deposit, "apikey": ApiKey}
)

# Stable event type name -> event class. Names are written explicitly so that renaming a
# class cannot silently change what is stored; tests check every event class is listed.
EVENT_TYPES: Mapping[str, type[Aggregate.Event]] = types.MappingProxyType(
    {
        "WalletOpened": Wallet.WalletOpened,
        "WalletCredited": Wallet.WalletCredited,
        "WalletDebited": Wallet.WalletDebited,
        "FundsLocked": Wallet.FundsLocked,
        "LockReleased": Wallet.LockReleased,
        "LockSettled": Wallet.LockSettled,
        "SettlementReceived": Wallet.SettlementReceived,
        "CreditReserved": Wallet.CreditReserved,
        "ReservationConfirmed": Wallet.ReservationConfirmed,
        "ReservationRolledBack": Wallet.ReservationRolledBack,
        "ReservationExpired": Wallet.ReservationExpired,
        "DepositCredited": Wallet.DepositCredited,
        "DepositCreated": Deposit.DepositCreated,
        "DepositConfirming": Deposit.DepositConfirming,
        "DepositPending": Deposit.DepositPending,
        "DepositConfirmed": Deposit.DepositConfirmed,
        "DepositFailed": Deposit.DepositFailed,
        "DepositExpired": Deposit.DepositExpired,
        "ApiKeyCreated": ApiKey.ApiKeyCreated,
        "ApiKeyRevoked": ApiKey.ApiKeyRevoked,
    }
)
_NAMES: dict[type, str] = {cls: name for name, cls in EVENT_TYPES.items()}

# Current payload schema version of each event type; bump it and add an upcaster
# UPCASTERS[(name, old_version)] whenever an event's fields change.
SCHEMA_VERSIONS: dict[str, int] = dict.fromkeys(EVENT_TYPES, 1)

# (type name, from version) -> function lifting a payload from that version to the next.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}

CHAIN_TX_CLAIMED = "ChainTxClaimed"
"""Type of the one event in a deposit's chain-transaction claim stream. Not an aggregate event:
projections can ignore it; it is named here so that readers of the log need not import the commands."""

LOGGED_TYPES: frozenset[str] = frozenset({*EVENT_TYPES, CHAIN_TX_CLAIMED})
"""Every event type the service writes to the log: what a filter by type may name. A name outside it
would match nothing, ever, so the read endpoints refuse it instead of answering an empty success."""

# Fields every event has; they travel in the row's columns, never in ``data``.
ENVELOPE = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


# ---------------------------------------------------------------- names


def type_name(event: type | object) -> str:
    """The stable name of an event class or event object."""
    cls = event if isinstance(event, type) else type(event)
    try:
        return _NAMES[cls]
    except KeyError:
        raise KeyError(f"unregistered event class {cls.__qualname__}") from None


def event_class(name: str) -> type[Aggregate.Event]:
    try:
        return EVENT_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown event type {name!r}") from None


def aggregate_type_of(name: str) -> str:
    """The stream category (``wallet``, ``deposit``, ``apikey``) an event type belongs to."""
    cls = event_class(name)
    for category, aggregate_class in AGGREGATE_TYPES.items():
        if issubclass(cls, aggregate_class.Event):
            return category
    raise KeyError(f"event type {name!r} belongs to no registered aggregate")  # pragma: no cover


# ---------------------------------------------------------------- streams


@functools.lru_cache(maxsize=16_384)
def stream_for(category: str, aggregate_id: UUID) -> str:
    """Memoized: a command names its streams several times, and UUID.__str__ is slow Python."""
    if category not in AGGREGATE_TYPES:
        raise KeyError(f"unknown stream category {category!r}")
    if not isinstance(aggregate_id, UUID):
        raise TypeError("aggregate_id must be a UUID")
    return f"{category}-{aggregate_id}"


def wallet_stream(wallet_id: UUID) -> str:
    return stream_for("wallet", wallet_id)


def deposit_stream(deposit_id: UUID) -> str:
    return stream_for("deposit", deposit_id)


def apikey_stream(key_id: UUID) -> str:
    return stream_for("apikey", key_id)


def stream_id(aggregate: Aggregate) -> str:
    for category, aggregate_class in AGGREGATE_TYPES.items():
        if type(aggregate) is aggregate_class:
            return stream_for(category, aggregate.id)
    raise TypeError(f"unregistered aggregate type {type(aggregate).__qualname__}")


def parse_stream_id(stream_id: str) -> tuple[str, UUID]:
    """``"wallet-<uuid>"`` -> ``("wallet", UUID)``; only the canonical lowercase form is valid."""
    category, sep, rest = stream_id.partition("-") if isinstance(stream_id, str) else ("", "", "")
    try:
        aggregate_id = UUID(rest)
    except ValueError:
        aggregate_id = None
    if not sep or category not in AGGREGATE_TYPES or aggregate_id is None or str(aggregate_id) != rest:
        raise ValidationError(f"invalid stream id {stream_id!r}", field="stream_id")
    return category, aggregate_id


def aggregate_for_stream(stream_id: str) -> type[Aggregate]:
    return AGGREGATE_TYPES[parse_stream_id(stream_id)[0]]


# ---------------------------------------------------------------- payloads


def event_fields(cls: type[Any]) -> dict[str, Any]:
    """Payload field name -> resolved annotation (the envelope fields excluded)."""
    fields = _FIELDS.get(cls)
    if fields is None:
        hints = get_type_hints(cls)
        fields = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in ENVELOPE}
        _FIELDS[cls] = fields
    return fields


_FIELDS: dict[type, dict[str, Any]] = {}


def payload_from_event(event: AnyEvent) -> tuple[str, dict[str, Any]]:
    """``(type name, data)``: UUIDs as strings, datetimes as ISO 8601 UTC, tuples as lists."""
    name = type_name(event)
    data = {key: _encode(getattr(event, key), key) for key in event_fields(type(event))}
    return name, data


def event_from_payload(
    type_name: str,
    originator_id: UUID | str,
    version: int,
    timestamp: datetime | str,
    data: Mapping[str, Any],
    *,
    schema_version: int | None = None,
) -> AnyEvent:
    """Rebuild an event object from a stored row (upcasting first if ``schema_version`` is old)."""
    cls = event_class(type_name)
    if schema_version is not None:
        _, data = upcast(type_name, schema_version, data)
    fields = event_fields(cls)
    missing, extra = fields.keys() - data.keys(), data.keys() - fields.keys()
    if missing or extra:
        raise ValueError(
            f"{type_name} payload does not match its schema: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    kwargs: dict[str, Any] = {key: _decoder(hint)(data[key], key) for key, hint in fields.items()}
    kwargs["originator_id"] = _decode(UUID, originator_id, "originator_id")
    kwargs["originator_version"] = _decode(int, version, "originator_version")
    kwargs["timestamp"] = _decode(datetime, timestamp, "timestamp")
    if issubclass(cls, CanInitAggregate):
        kwargs["originator_topic"] = get_topic(AGGREGATE_TYPES[aggregate_type_of(type_name)])
    return cls(**kwargs)


def upcast(type_name: str, schema_version: int, data: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """Apply ``UPCASTERS`` one version at a time until the payload is current."""
    event_class(type_name)  # unknown names fail here, with a clear message
    current = SCHEMA_VERSIONS[type_name]
    if schema_version > current:
        raise ValueError(f"{type_name} v{schema_version} is newer than this code (v{current})")
    lifted = dict(data)
    while schema_version < current:
        try:
            upcaster = UPCASTERS[(type_name, schema_version)]
        except KeyError:
            raise LookupError(f"no upcaster for {type_name} v{schema_version}") from None
        lifted = upcaster(dict(lifted))
        schema_version += 1
    return schema_version, lifted


@overload
def replay(events: Iterable[AnyEvent]) -> Aggregate | None: ...


@overload
def replay(events: Iterable[AnyEvent], aggregate: A) -> A: ...


@overload
def replay(events: Iterable[AnyEvent], aggregate: A | None) -> A | None: ...


def replay(events: Iterable[AnyEvent], aggregate: Aggregate | None = None) -> Aggregate | None:
    """Fold events (a created event first, unless ``aggregate`` is given) into an aggregate.

    ``replay(events)`` is None only for an empty history.
    """
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


def _encode(value: Any, key: str) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise TypeError(f"{key}: naive datetime cannot be stored")
        return value.astimezone(UTC).isoformat()
    if isinstance(value, tuple | list):
        return [_encode(v, key) for v in value]
    raise TypeError(f"{key}: {type(value).__name__} is not JSON-friendly")


Decode = Callable[[Any, str], Any]


def _decode(hint: Any, value: Any, key: str) -> Any:
    return _decoder(hint)(value, key)


@functools.cache
def _decoder(hint: Any) -> Decode:
    """The function that checks and decodes a stored value of this annotation, made once per annotation:
    a process that follows other workers' appends decodes every event they write."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        optional = len(options) < len(get_args(hint))
        if len(options) != 1:
            def unsupported(value: Any, key: str) -> Any:  # pragma: no cover
                if value is None and optional:
                    return None
                raise TypeError(f"{key}: unsupported union {hint}")

            return unsupported
        inner = _decoder(options[0])
        if not optional:
            return inner
        return lambda value, key: None if value is None else inner(value, key)
    if origin is tuple:
        item = _decoder(get_args(hint)[0])

        def decode_tuple(value: Any, key: str) -> Any:
            if not isinstance(value, list | tuple):
                raise TypeError(f"{key}: expected a list, got {type(value).__name__}")
            return tuple(item(v, key) for v in value)

        return decode_tuple
    return functools.partial(_decode_scalar, hint)


def _decode_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is UUID:
        return value if isinstance(value, UUID) else UUID(_expect(str, value, key))
    if hint is datetime:
        if not isinstance(value, datetime):
            value = datetime.fromisoformat(_expect(str, value, key))
        if value.utcoffset() is None:
            raise ValueError(f"{key}: naive datetime")
        return value.astimezone(UTC)
    if hint is int and isinstance(value, bool):
        raise TypeError(f"{key}: expected int, got bool")
    if hint in (int, str, bool):
        return _expect(hint, value, key)
    raise TypeError(f"{key}: unsupported field type {hint}")  # pragma: no cover


def _expect(kind: type, value: Any, key: str) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value
