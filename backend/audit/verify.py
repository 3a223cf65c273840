"""Hash-chain verification: recompute every link from the canonical encoding and report each break.

Input is an async iterable of *batches* of ChainRow in position order, from the database
(`log_batches`, `stream_batches`) or an export file (`backend.audit.export.read_export`). Batches, not single
events, because the per-event cost of an async generator would dominate the hashing.

Each link is checked against the *stored* hash of the stream's previous event:
``stored_hash_v == sha256(stored_hash_{v-1} || canonical(event_v))``. When every link holds the
stored hashes are exactly the recomputed chain; when one event is altered only that event's link
fails, so a break points at the tampered version instead of at everything after it. Memory is one
(version, hash) per stream, whatever the length of the log.

Break kinds (stable names, documented in docs/AUDIT.md):

- ``hash_mismatch``: the event does not hash to its stored hash (its content or its hash changed).
- ``missing_version``: the stream skips versions (events deleted); ``version`` is the first missing one.
- ``broken_link``: the first event after such a gap does not chain from the event before the gap.
- ``out_of_order``: a version at or below the stream's last one (an event moved or duplicated).
- ``missing_position``: (whole log only) positions skipped; ``position`` is the first missing one.
- ``position_out_of_order``: (whole log only) a position at or below the previous one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import asyncpg
import orjson

from backend.db import Connection
from backend.store.hashing import GENESIS

ChainRow: TypeAlias = tuple[int, str, int, str, Any, str, str]
"""(position, stream_id, version, type, data, recorded_at, stored hash as lowercase hex).

``data`` is the event's JSON value (a dict), or its JSON text when the verifier is told ``raw_data``;
``recorded_at`` is already in the canonical text form (YYYY-MM-DDTHH:MM:SS.ffffffZ)."""

Batch: TypeAlias = "Sequence[ChainRow] | list[asyncpg.Record]"
"""A page of rows: tuples from an export file, or records (the same columns, in order) from the database."""

MAX_BREAKS = 1000
"""Breaks kept in a report (all are counted): a badly damaged log must not exhaust memory."""

PAGE_SIZE = 5000
CHUNK = 1000
"""Rows verified between two yields to the event loop, so the next page keeps arriving meanwhile."""

# recorded_at formatted by the database exactly as backend.store.hashing.format_time does; an infinite
# time (no append writes one, PostgreSQL takes it) has no such form, to_char gives NULL: shown as
# 'infinity' or '-infinity' instead, it fails its hash like any other changed time.
RECORDED_AT_SQL = """coalesce(to_char(recorded_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    recorded_at::text)"""
CHAIN_COLUMNS = f"position, stream_id, version, type, data::text, {RECORDED_AT_SQL}, encode(hash, 'hex')"
LOG_PAGE_SQL = f"""
select {CHAIN_COLUMNS} from events where position > $1 and position <= $2 order by position limit $3
"""
HEAD_SQL = "select coalesce(max(position), 0) from events"
STREAM_PAGE_SQL = f"""
select {CHAIN_COLUMNS} from events where stream_id = $1 and version > $2 order by version limit $3
"""


@dataclass(frozen=True, slots=True)
class ChainBreak:
    kind: str
    stream_id: str | None
    version: int | None
    position: int
    expected: str | int | None
    found: str | int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id,
            "version": self.version,
            "position": self.position,
            "kind": self.kind,
            "expected": self.expected,
            "found": self.found,
        }


@dataclass(slots=True)
class Report:
    source: str
    stream: str | None = None
    partial: bool = False
    streams_checked: int = 0
    events_checked: int = 0
    break_count: int = 0
    breaks: list[ChainBreak] = field(default_factory=list)
    first_position: int | None = None
    last_position: int | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.break_count == 0

    @property
    def events_per_s(self) -> float:
        return self.events_checked / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source": self.source,
            "stream": self.stream,
            "partial": self.partial,
            "streams_checked": self.streams_checked,
            "events_checked": self.events_checked,
            "break_count": self.break_count,
            "breaks": [b.as_dict() for b in self.breaks],
            "breaks_truncated": self.break_count > len(self.breaks),
            "first_position": self.first_position,
            "last_position": self.last_position,
            "elapsed_s": round(self.elapsed_s, 3),
            "events_per_s": round(self.events_per_s, 1),
        }


class ChainVerifier:
    """Feed batches in position order with `check`, then read `report`.

    contiguous: the rows are the whole log (or a range of it), so positions must follow each other.
    partial: the rows may start mid-log (a ranged export): the first position and each stream's
    first version are taken as given, and that event's stored hash anchors the rest of its chain.
    raw_data: ``data`` arrives as JSON text (from the database) rather than as a parsed value.
    """

    def __init__(self, report: Report, *, contiguous: bool, raw_data: bool = False,
                 max_breaks: int = MAX_BREAKS) -> None:
        self.report = report
        self.contiguous = contiguous
        self.encode_data = encode_text if raw_data else encode_parsed
        self.max_breaks = max_breaks
        self.heads: dict[str, tuple[int, bytes]] = {}
        self._types: dict[str, bytes] = {}
        self.started = time.perf_counter()

    def _break(self, kind: str, stream_id: str | None, version: int | None, position: int,
               expected: str | int | None, found: str | int | None) -> None:
        self.report.break_count += 1
        if len(self.report.breaks) < self.max_breaks:
            self.report.breaks.append(ChainBreak(kind, stream_id, version, position, expected, found))

    def _start(self, first_position: int) -> None:
        """The whole log starts at position 1: check() flags the positions missing before the first, once."""
        report = self.report
        report.first_position = first_position
        report.last_position = 0 if self.contiguous and not report.partial else first_position - 1

    def check(self, rows: Batch) -> None:
        """Verify a batch; the hot loop, so everything it touches is bound to a local first."""
        if not rows:
            return
        report = self.report
        if report.last_position is None:
            self._start(rows[0][0])
        last_position: int = report.last_position  # type: ignore[assignment]
        heads, types, flag, encode = self.heads, self._types, self._break, self.encode_data
        partial, contiguous, dumps, sha256 = report.partial, self.contiguous, orjson.dumps, hashlib.sha256
        for position, stream_id, version, type_, data, recorded_at, stored in rows:
            if contiguous and position != last_position + 1:
                if position <= last_position:
                    flag("position_out_of_order", stream_id, version, position, last_position + 1, position)
                    continue
                flag("missing_position", None, None, last_position + 1, last_position + 1, position)
            last_position = position
            previous_version, previous = heads.get(stream_id) or (0, GENESIS)
            if previous_version == 0 and partial and version != 1:
                heads[stream_id] = (version, stored_bytes(stored))  # a ranged export: this event anchors its stream
                continue
            expected = previous_version + 1
            if version < expected:
                flag("out_of_order", stream_id, version, position, expected, version)
                continue
            type_json = types.get(type_) or types.setdefault(type_, dumps(type_))
            canonical = b'{"data":%b,"recorded_at":"%b","stream_id":%b,"type":%b,"version":%d}' % (
                encode(data), recorded_at.encode(), dumps(stream_id), type_json, version)
            computed = sha256(previous + canonical).digest()
            if computed.hex() != stored:
                if version == expected:
                    flag("hash_mismatch", stream_id, version, position, computed.hex(), stored)
                else:
                    flag("missing_version", stream_id, expected, position, expected, version)
                    flag("broken_link", stream_id, version, position, computed.hex(), stored)
                computed = stored_bytes(stored)  # the rest of the chain links to what is stored
            elif version != expected:  # a gap whose next event was re-hashed to fit
                flag("missing_version", stream_id, expected, position, expected, version)
            heads[stream_id] = (version, computed)
        report.last_position = last_position
        report.events_checked += len(rows)
        report.streams_checked = len(heads)
        report.elapsed_s = time.perf_counter() - self.started


def stored_bytes(stored: str) -> bytes:
    try:
        return bytes.fromhex(stored)
    except (TypeError, ValueError):
        return b""  # not a hash at all: the next link is reported broken as well


def encode_parsed(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


def encode_text(text: str) -> bytes:
    """jsonb's text output is not the canonical form (spaces, keys by length): parse and re-encode."""
    try:
        return orjson.dumps(orjson.loads(text), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        return text.encode()  # cannot be what was hashed: reported as a mismatch


Progress = Callable[[Report], None]


async def verify(
    batches: AsyncIterable[Batch],
    report: Report,
    *,
    contiguous: bool,
    raw_data: bool = False,
    progress: Progress | None = None,
    progress_every_s: float = 1.0,
) -> Report:
    """Run the verifier over every batch, calling progress at most every progress_every_s."""
    verifier = ChainVerifier(report, contiguous=contiguous, raw_data=raw_data)
    next_progress = time.perf_counter() + progress_every_s
    async for batch in batches:
        for start in range(0, len(batch), CHUNK):
            verifier.check(batch[start:start + CHUNK])
            await asyncio.sleep(0)  # let the prefetched next page arrive while this one is hashed
        if progress is not None and time.perf_counter() >= next_progress:
            progress(report)
            next_progress = time.perf_counter() + progress_every_s
    report.elapsed_s = time.perf_counter() - verifier.started
    return report


async def log_batches(conn: Connection, to_position: int, page_size: int = PAGE_SIZE) -> AsyncIterator[Batch]:
    """The log up to to_position in keyset pages, the next page requested before this one is handed out."""
    pending: asyncio.Future[Any] | None = asyncio.ensure_future(conn.fetch(LOG_PAGE_SQL, 0, to_position, page_size))
    try:
        while pending is not None:
            rows = await pending
            pending = None
            if len(rows) == page_size:
                pending = asyncio.ensure_future(conn.fetch(LOG_PAGE_SQL, rows[-1][0], to_position, page_size))
            yield rows
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)


async def head(conn: Connection) -> int:
    return int(await conn.fetchval(HEAD_SQL))


async def stream_batches(
    conn: Connection, stream_id: str, page_size: int = PAGE_SIZE
) -> AsyncIterator[Batch]:
    version = 0
    while True:
        rows = await conn.fetch(STREAM_PAGE_SQL, stream_id, version, page_size)
        if rows:
            yield rows
        if len(rows) < page_size:
            return
        version = rows[-1][2]


async def verify_database(
    conn: Connection, stream: str | None = None, *, progress: Progress | None = None
) -> Report:
    """Verify one stream, or the whole log up to its head now (then positions must also be gap-free)."""
    report = Report(source="database", stream=stream)
    batches = stream_batches(conn, stream) if stream is not None else log_batches(conn, await head(conn))
    return await verify(batches, report, contiguous=stream is None, raw_data=True, progress=progress)
