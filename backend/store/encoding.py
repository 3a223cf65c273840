"""Validating and encoding an append call before anything reaches the database."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.store.events import ANY, MAX_STREAM_ID_LENGTH, MAX_TYPE_LENGTH, InvalidEvent, Write
from backend.store.hashing import encode_data

INT64_MAX = 2**63 - 1
_OBJECTS = (dict, Mapping)  # dict first: a dict is matched without asking the ABC


@dataclass(slots=True)
class EncodedEvent:
    type: str
    data: bytes
    metadata: bytes
    event_id: uuid.UUID


@dataclass(slots=True)
class EncodedWrite:
    stream_id: str
    expected_version: int
    events: list[EncodedEvent]


def check_json(value: Any, path: str) -> None:
    """Event data is JSON without floats (money is integer minor units) and with 64-bit integers.

    Most values are plain dicts, lists, strings and integers that pass: `_plain` says so without
    building the path of every value; anything else (or anything wrong) is walked by `_check`, which
    names the path of what it refuses."""
    if not _plain(value):
        _check(value, path)


def _plain(value: Any) -> bool:
    """True when value is valid JSON of exactly dict, list, tuple, str, int, bool and None (else False,
    even for a valid value of other types: `_check` then decides)."""
    cls = value.__class__
    if cls is dict:
        for key, item in value.items():
            if key.__class__ is not str:
                return False
            kind = item.__class__
            if kind is str:
                if "\x00" in item:
                    return False
            elif kind is int:
                if not -INT64_MAX - 1 <= item <= INT64_MAX:
                    return False
            elif not (item is None or kind is bool or _plain(item)):
                return False
        return True
    if cls is str:
        return "\x00" not in value
    if cls is int:
        return bool(-INT64_MAX - 1 <= value <= INT64_MAX)
    if cls is list or cls is tuple:
        return all(_plain(item) for item in value)
    return value is None or cls is bool


def _check(value: Any, path: str) -> None:
    """Concrete types are tested first: an isinstance check against an ABC such as Mapping is slow."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidEvent(f"{path}: strings may not contain NUL characters")
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise InvalidEvent(f"{path}: integer out of 64-bit range")
    elif isinstance(value, float):
        raise InvalidEvent(f"{path}: floats are not allowed in events; use integers")
    elif isinstance(value, _OBJECTS):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidEvent(f"{path}: object keys must be strings")
            _check(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]")
    else:
        raise InvalidEvent(f"{path}: {type(value).__name__} is not a JSON value")


def encode_writes(writes: Sequence[Write], *, allow_empty: bool = False) -> tuple[list[EncodedWrite], int, int]:
    """Validate and encode an append call; raises InvalidEvent before anything reaches the database."""
    if not writes and not allow_empty:
        raise InvalidEvent("an append needs at least one write")
    encoded: list[EncodedWrite] = []
    seen_ids: set[uuid.UUID] = set()
    size = 0
    for write in writes:
        stream_id = write.stream_id
        if not isinstance(stream_id, str) or not 1 <= len(stream_id) <= MAX_STREAM_ID_LENGTH:
            raise InvalidEvent(f"stream_id must be a string of 1 to {MAX_STREAM_ID_LENGTH} characters")
        if "\x00" in stream_id:
            raise InvalidEvent("stream_id may not contain NUL characters")
        expected = write.expected_version
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < ANY:
            raise InvalidEvent(f"expected_version must be an integer >= 0, NO_STREAM or ANY, got {expected!r}")
        if not write.events:
            raise InvalidEvent(f"write to {stream_id!r} has no events")
        events = []
        for event in write.events:
            if not isinstance(event.type, str) or not 1 <= len(event.type) <= MAX_TYPE_LENGTH:
                raise InvalidEvent(f"event type must be a string of 1 to {MAX_TYPE_LENGTH} characters")
            if not isinstance(event.data, _OBJECTS):
                raise InvalidEvent("event data must be a JSON object")
            if not isinstance(event.event_id, uuid.UUID):
                raise InvalidEvent("event_id must be a UUID")
            if event.event_id in seen_ids:
                raise InvalidEvent(f"event_id {event.event_id} appears twice in one append")
            seen_ids.add(event.event_id)
            check_json(event.data, "data")
            check_json(event.metadata, "metadata")
            data = encode_data(event.data)
            metadata = encode_data(event.metadata)
            size += len(data) + len(metadata)
            events.append(EncodedEvent(event.type, data, metadata, event.event_id))
        encoded.append(EncodedWrite(stream_id, expected, events))
    return encoded, len(seen_ids), size
