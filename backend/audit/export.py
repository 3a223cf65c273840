"""The NDJSON export of the log: one event per line, with its hash, readable without the database.

A line holds position, stream_id, version, type, data, metadata, event_id, recorded_at and hash
(hex), in that order. ``data`` is written in its canonical form (compact, keys sorted) and
``recorded_at`` as YYYY-MM-DDTHH:MM:SS.ffffffZ, so an auditor can recompute every hash chain from
the file alone (see docs/AUDIT.md). Reading and writing go page by page: memory stays constant.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Iterator
from typing import IO, Any, NamedTuple

import asyncpg
import orjson

from backend.audit.verify import RECORDED_AT_SQL, Batch, ChainRow, encode_text, head
from backend.db import Connection

EXPORT_COLUMNS = (
    f"position, stream_id, version, type, data::text, metadata::text, event_id::text, {RECORDED_AT_SQL}, hash"
)
EXPORT_PAGE_SQL = f"""
select {EXPORT_COLUMNS} from events where position > $1 and position <= $2 order by position limit $3
"""

PAGE_SIZE = 2000
READ_SIZE = 4 << 20
"""Bytes read from an export file per batch."""
MAX_LINE_BYTES = 16 << 20
"""The longest export line read: 256 times the largest request body the API takes (64 KiB), twice an
append batch (8 MiB). A longer line (or input with no newline) is refused instead of filling memory."""


class ExportFormatError(ValueError):
    """A line of an export file is not an exported event."""


def event_json(row: asyncpg.Record | tuple[Any, ...]) -> bytes:
    """One exported event (EXPORT_COLUMNS) as compact JSON; also the event shape of the history API."""
    position, stream_id, version, type_, data, metadata, event_id, recorded_at, hash_ = row
    return orjson.dumps({
        "position": position,
        "stream_id": stream_id,
        "version": version,
        "type": type_,
        "data": orjson.Fragment(encode_text(data)),
        "metadata": orjson.Fragment(encode_text(metadata)),
        "event_id": event_id,
        "recorded_at": recorded_at,
        "hash": hash_.hex(),
    })


async def export_pages(
    conn: Connection, after: int = 0, to: int | None = None, page_size: int = PAGE_SIZE
) -> AsyncIterator[bytes]:
    """NDJSON chunks (one per page) of the events after `after` up to `to` (default: the head now).

    Positions become visible strictly in order and never change, so paging up to a fixed `to` reads
    one consistent prefix of the log even while appends continue."""
    if to is None:
        to = await head(conn)
    position = after
    while position < to:
        page = await export_page(conn, position, to, page_size)
        if page is None:
            return
        yield page.ndjson
        position = page.last


class ExportPage(NamedTuple):
    ndjson: bytes
    last: int
    """The position of its last event: where the next page starts after."""


async def export_page(conn: Connection, after: int, to: int, page_size: int = PAGE_SIZE) -> ExportPage | None:
    """The NDJSON of the first page_size events in (after, to], or None when there are none."""
    rows = await conn.fetch(EXPORT_PAGE_SQL, after, to, page_size)
    return ExportPage(b"".join([event_json(row) + b"\n" for row in rows]), rows[-1][0]) if rows else None


CHAIN_FIELDS = operator.itemgetter("position", "stream_id", "version", "type", "data", "recorded_at", "hash")


def _chain_row(line: bytes, number: int) -> ChainRow:
    try:
        event = orjson.loads(line)
        row: ChainRow = CHAIN_FIELDS(event)
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ExportFormatError(f"line {number}: not an exported event ({type(exc).__name__}: {exc})") from None
    if not _well_typed(row):
        raise ExportFormatError(f"line {number}: a field has the wrong type")
    return row


def _well_typed(row: ChainRow) -> bool:
    """Position and version are integers and the text fields strings (data may be any JSON value)."""
    return (type(row[0]) is int and type(row[2]) is int and type(row[1]) is str and type(row[3]) is str
            and type(row[5]) is str and type(row[6]) is str)


def parse_lines(lines: list[bytes], first_number: int) -> list[ChainRow]:
    """Every line as a chain row, without a Python call per line; line by line only to name a bad one."""
    try:
        rows: list[ChainRow] = list(map(CHAIN_FIELDS, map(orjson.loads, lines)))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        rows = []
    if len(rows) != len(lines) or not all(map(_well_typed, rows)):
        return [_chain_row(line, number) for number, line in enumerate(lines, first_number) if line.strip()]
    return rows


async def read_export(file: IO[bytes], stream: str | None = None) -> AsyncIterator[Batch]:
    """Batches of chain rows from an export file (optionally only one stream's), in file order."""
    for number, lines in line_batches(file):
        rows = parse_lines(lines, number)
        if stream is not None:
            rows = [row for row in rows if row[1] == stream]
        if rows:
            yield rows


def line_batches(file: IO[bytes]) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, lines) per read; memory stays under READ_SIZE + MAX_LINE_BYTES."""
    number, rest = 1, b""
    while chunk := file.read(READ_SIZE):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        longest = max([len(rest), *map(len, lines)])
        if longest > MAX_LINE_BYTES:
            too_long = number + next((i for i, line in enumerate(lines) if len(line) == longest), len(lines))
            raise ExportFormatError(f"line {too_long}: longer than {MAX_LINE_BYTES >> 20} MiB: not an exported event")
        if lines:
            yield number, lines
            number += len(lines)
    if rest:
        yield number, [rest]
