"""The Server-Sent Events wire format, as bytes.

aiohttp-sse's ``send`` builds each frame with a StringIO and two regular expressions; at a thousand
subscribers times a thousand events a second that is too slow, so an event's frame is encoded once,
when it enters the shared window, and every subscriber writes the same bytes. Data is always one
line of JSON (orjson escapes newlines inside strings), so a frame never needs several ``data:`` lines.

Event frames are unnamed by default: a browser's ``onmessage`` only receives frames without an
``event:`` field, and the type travels in the data anyway. ``?event_names=true`` names them by type,
for pages that register one listener per type.
"""

from __future__ import annotations

from typing import Any

import orjson

from backend.store.events import RecordedEvent

_JSON_OPTIONS = orjson.OPT_UTC_Z


def event_body(event: RecordedEvent) -> dict[str, Any]:
    """What a client sees of an event: never its metadata (actor, request ids) nor its hash."""
    return {
        "position": event.position,
        "stream_id": event.stream_id,
        "version": event.version,
        "type": event.type,
        "data": event.data,
        "recorded_at": event.recorded_at,
    }


def dumps(value: Any) -> bytes:
    """value as one line of JSON. A total of a currency's money can pass what orjson encodes (64 bits):
    such an integer goes out as its exact digits, which JSON allows and the dashboard reads exactly."""
    try:
        return orjson.dumps(value, option=_JSON_OPTIONS)
    except orjson.JSONEncodeError:
        return orjson.dumps(_wide_integers_as_digits(value), option=_JSON_OPTIONS)


_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


def _wide_integers_as_digits(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _UINT64_MAX:
        return orjson.Fragment(str(value))
    if isinstance(value, dict):
        return {key: _wide_integers_as_digits(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_wide_integers_as_digits(item) for item in value]
    return value


def _field(value: str) -> bytes:
    """A single-line field value: line breaks would end the field early, so they become spaces."""
    return value.replace("\r", " ").replace("\n", " ").encode()


def frame(position: int, event: str | None, data: bytes) -> bytes:
    """``id:`` (the global position, a browser's resume point), ``event:`` unless None (an unnamed
    frame reaches ``onmessage``) and one ``data:`` line."""
    if event is None:
        return b"id: %d\ndata: %s\n\n" % (position, data)
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (position, _field(event), data)


def event_frame(event: RecordedEvent, named: bool = False) -> bytes:
    return frame(event.position, event.type if named else None, dumps(event_body(event)))


def named_frames(events: list[RecordedEvent]) -> bytes:
    """The frames of ``?event_names=true`` streams: each named by its event type."""
    return b"".join(event_frame(event, named=True) for event in events)


def refusal(retry_ms: int, problem: bytes) -> bytes:
    """A refused stream's whole body: ``retry:`` (when a browser comes back) and an ``event: refused``
    frame whose data is the problem+json document (why, and ``retry_after``)."""
    return b"retry: %d\nevent: refused\ndata: %s\n\n" % (retry_ms, problem)


def checkpoint(position: int) -> bytes:
    """An id-only frame: it moves the browser's last event id and dispatches nothing."""
    return b"id: %d\n\n" % position


def opening(retry_ms: int, position: int | None) -> bytes:
    """The first frame: reconnection advice and, for log streams, the start position as the resume
    point, so that a client dropped before its first event resumes from there (not from its URL)."""
    if position is None:
        return b"retry: %d\n\n" % retry_ms
    return b"retry: %d\nid: %d\n\n" % (retry_ms, position)


PING = b": ping\n\n"
"""The heartbeat: a comment, which clients ignore (aiohttp-sse's own wording)."""


def chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk (aiohttp-sse always streams chunked), for bytes written straight to the
    transport: a complete chunk can go between any two of aiohttp's own writes."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)
