"""The canonical encoding of an event and the per-stream hash chain (documented in README.md).

canonical(e) = orjson.dumps({"data": e.data, "recorded_at": RFC3339(e.recorded_at), "stream_id": e.stream_id,
"type": e.type, "version": e.version}, option=OPT_SORT_KEYS): compact UTF-8 JSON, keys of every object
sorted, recorded_at in UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ (always six fraction digits).
hash_v = sha256(hash_{v-1} || canonical(e_v)), hash_0 = 32 zero bytes.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson

GENESIS = bytes(32)


def format_time(moment: datetime) -> str:
    """YYYY-MM-DDTHH:MM:SS.ffffffZ in UTC."""
    return quoted_time(moment)[1:-1].decode()


def quoted_time(moment: datetime) -> bytes:
    """format_time as a JSON string, as the canonical encoding holds it. orjson writes it, in C (a
    seventh of isoformat's cost, on every append), except for a whole second: orjson drops a zero
    fraction, the format keeps all six digits."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    if moment.microsecond:
        return orjson.dumps(moment, option=orjson.OPT_UTC_Z)
    return b'"' + moment.replace(tzinfo=None).isoformat(timespec="microseconds").encode() + b'Z"'


def encode_data(data: Any) -> bytes:
    """The data object as it appears inside the canonical encoding (and as it is stored)."""
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


def canonical_bytes(stream_id: str, version: int, type_: str, data_bytes: bytes, recorded_at: datetime) -> bytes:
    """Byte-identical to orjson.dumps of the whole dict with sorted keys, without re-encoding data."""
    return b"".join(
        (
            b'{"data":',
            data_bytes,
            b',"recorded_at":',
            quoted_time(recorded_at),
            b',"stream_id":',
            orjson.dumps(stream_id),
            b',"type":',
            orjson.dumps(type_),
            b',"version":',
            str(version).encode(),
            b"}",
        )
    )


def chain(previous: bytes, canonical: bytes) -> bytes:
    return hashlib.sha256(previous + canonical).digest()


def event_hash(previous: bytes, stream_id: str, version: int, type_: str, data: Any, recorded_at: datetime) -> bytes:
    return chain(previous, canonical_bytes(stream_id, version, type_, encode_data(data), recorded_at))
