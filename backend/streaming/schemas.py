"""JSON Schemas of what the log streams send, for /openapi.json: one per event type, read off the
domain's event classes (backend.domain.registry) so that a new event or field is documented at once."""

from __future__ import annotations

import types
from datetime import datetime
from typing import Any, Union, get_args, get_origin
from uuid import UUID

from backend.domain.registry import CHAIN_TX_CLAIMED, EVENT_TYPES, event_fields

UUID_SCHEMA = {"type": "string", "format": "uuid"}
TIME_SCHEMA = {"type": "string", "format": "date-time"}
CHAIN_TX_CLAIMED_DATA = {
    "currency": {"type": "string"}, "chain_tx_id": {"type": "string"}, "deposit_id": UUID_SCHEMA,
    "wallet_id": UUID_SCHEMA, "occurred_at": TIME_SCHEMA,
}
"""The one event outside the aggregates: it claims a chain transaction for a deposit
(backend.commands.deposits), in a stream of its own."""
WALLET_FIGURES = {
    "type": "object",
    "description": "the wallet's figures right after this event",
    "properties": {name: {"type": "integer"} for name in ("balance", "available", "locked", "reserved", "version")},
    "required": ["balance", "available", "locked", "reserved", "version"],
}


def field_schema(hint: Any) -> dict[str, Any]:
    """The JSON form of an event field as the registry encodes it (UUIDs and times as strings)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return {"anyOf": [field_schema(arg) for arg in get_args(hint)]}
    if origin in (tuple, list):
        return {"type": "array", "items": field_schema(get_args(hint)[0])}
    simple: dict[Any, dict[str, Any]] = {
        bool: {"type": "boolean"}, int: {"type": "integer"}, str: {"type": "string"}, UUID: UUID_SCHEMA,
        datetime: TIME_SCHEMA, type(None): {"type": "null"},
    }
    if hint not in simple:
        raise TypeError(f"no JSON Schema for event field type {hint!r}")
    return simple[hint]


def data_schemas() -> dict[str, dict[str, Any]]:
    """Event type -> the schema of its ``data``."""
    found: dict[str, dict[str, Any]] = {}
    for name, cls in EVENT_TYPES.items():
        properties = {field: field_schema(hint) for field, hint in event_fields(cls).items()}
        found[name] = {"type": "object", "properties": properties, "required": list(properties)}
    found[CHAIN_TX_CLAIMED] = {"type": "object", "properties": CHAIN_TX_CLAIMED_DATA,
                               "required": list(CHAIN_TX_CLAIMED_DATA)}
    return found


def component_schemas(ref: str) -> dict[str, dict[str, Any]]:
    """``{Type}Event`` per event type (the whole frame data), ``StreamEvent`` (any of them, by
    ``type``) and ``WalletStreamEvent`` (one with the wallet's figures); ref formats a schema name
    into a $ref."""
    schemas: dict[str, dict[str, Any]] = {}
    mapping = {}
    for name, data in sorted(data_schemas().items()):
        schemas[f"{name}Event"] = {
            "type": "object",
            "description": f"a {name} event as the log streams send it (the data of an unnamed frame, or "
                           f"of a frame named {name} with ?event_names=true)",
            "properties": {
                "position": {"type": "integer", "minimum": 1, "description": "its global position, the frame id"},
                "stream_id": {"type": "string"},
                "version": {"type": "integer", "minimum": 1, "description": "its version in its stream"},
                "type": {"const": name},
                "data": data,
                "recorded_at": TIME_SCHEMA,
            },
            "required": ["position", "stream_id", "version", "type", "data", "recorded_at"],
        }
        mapping[name] = ref.format(model=f"{name}Event")
    schemas["StreamEvent"] = {
        "description": "one event of the log, by type",
        "oneOf": [{"$ref": target} for target in mapping.values()],
        "discriminator": {"propertyName": "type", "mapping": mapping},
    }
    schemas["WalletStreamEvent"] = {
        "description": "one event of a wallet stream, with the wallet's figures right after it",
        "allOf": [{"$ref": ref.format(model="StreamEvent")},
                  {"type": "object", "properties": {"wallet": WALLET_FIGURES}, "required": ["wallet"]}],
    }
    return schemas
