"""A tagged JSON encoding of aggregate state for snapshots (UUIDs, datetimes, sets, tuples, maps,
append-only maps).

Only types listed here round-trip; anything else fails loudly when the snapshot is taken, and a
snapshot that cannot be decoded is ignored (the aggregate is rebuilt from its events instead).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from backend.domain.closed import AppendOnlyMap
from backend.domain.wallet import Reservation

NAMED_TUPLES: dict[str, type[tuple[Any, ...]]] = {"Reservation": Reservation}
_NAMES = {cls: name for name, cls in NAMED_TUPLES.items()}


def encode_state(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        raise TypeError("floats have no place in aggregate state")
    if isinstance(value, UUID):
        return {"$uuid": str(value)}
    if isinstance(value, datetime):
        return {"$time": value.isoformat()}
    if type(value) in _NAMES:
        return {"$nt": _NAMES[type(value)], "v": [encode_state(v) for v in value]}
    if isinstance(value, tuple):
        return {"$tuple": [encode_state(v) for v in value]}
    if isinstance(value, list):
        return [encode_state(v) for v in value]
    if isinstance(value, set | frozenset):
        items = sorted((encode_state(v) for v in value), key=repr)
        return {"$frozenset" if isinstance(value, frozenset) else "$set": items}
    if isinstance(value, dict):
        return {"$map": [[encode_state(k), encode_state(v)] for k, v in value.items()]}
    if isinstance(value, AppendOnlyMap):
        return {"$appendonly": [[encode_state(k), encode_state(v)] for k, v in value.items()]}
    raise TypeError(f"cannot snapshot a {type(value).__name__}")


def decode_state(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_state(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$uuid" in value:
        return UUID(value["$uuid"])
    if "$time" in value:
        return datetime.fromisoformat(value["$time"])
    if "$nt" in value:
        return NAMED_TUPLES[value["$nt"]](*(decode_state(v) for v in value["v"]))
    if "$tuple" in value:
        return tuple(decode_state(v) for v in value["$tuple"])
    if "$set" in value:
        return {decode_state(v) for v in value["$set"]}
    if "$frozenset" in value:
        return frozenset(decode_state(v) for v in value["$frozenset"])
    if "$map" in value:
        return {decode_state(k): decode_state(v) for k, v in value["$map"]}
    if "$appendonly" in value:
        return AppendOnlyMap((decode_state(k), decode_state(v)) for k, v in value["$appendonly"])
    raise ValueError(f"unknown state tag in {sorted(value)}")
