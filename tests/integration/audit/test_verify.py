"""Hash-chain verification: a clean log verifies; every kind of tampering is found and pinpointed, in
the database and in an export file; an export made before the tampering still verifies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from backend.audit.export import ExportFormatError, read_export
from backend.audit.verify import Report, head, log_batches, verify, verify_database
from tests.integration.audit.support import export_file, fill_log, tamper


async def verify_db(pool: asyncpg.Pool, stream: str | None = None) -> Report:
    async with pool.acquire() as conn:
        return await verify_database(conn, stream)


async def verify_path(path: Path, *, stream: str | None = None, partial: bool = False) -> Report:
    with path.open("rb") as file:
        report = Report(source="export", stream=stream, partial=partial)
        return await verify(read_export(file, stream), report, contiguous=stream is None)


def breaks(report: Report) -> list[tuple[str, str | None, int | None, int]]:
    return [(b.kind, b.stream_id, b.version, b.position) for b in report.breaks]


async def test_a_clean_log_verifies_from_the_database_and_from_its_export(own_pool: asyncpg.Pool,
                                                                          tmp_path: Path) -> None:
    log = await fill_log(own_pool, streams=12, versions=6)
    report = await verify_db(own_pool)
    assert report.ok, report.as_dict()
    assert (report.events_checked, report.streams_checked) == (72, 12)
    assert (report.first_position, report.last_position) == (1, 72)
    assert report.as_dict()["breaks"] == [] and report.events_per_s > 0

    one = await verify_db(own_pool, log.streams[3])
    assert one.ok and (one.events_checked, one.streams_checked) == (6, 1)

    path = await export_file(own_pool, tmp_path / "log.ndjson")
    from_file = await verify_path(path)
    assert from_file.ok and (from_file.events_checked, from_file.streams_checked) == (72, 12)
    assert (await verify_path(path, stream=log.streams[3])).events_checked == 6


async def test_pages_are_prefetched_without_losing_or_repeating_rows(own_pool: asyncpg.Pool) -> None:
    await fill_log(own_pool, streams=5, versions=7)
    async with own_pool.acquire() as conn:
        report = await verify(log_batches(conn, await head(conn), page_size=4), Report(source="database"),
                              contiguous=True, raw_data=True)
    assert report.ok and report.events_checked == 35 and report.last_position == 35


async def test_changed_amount_is_pinpointed(own_database_url: str, own_pool: asyncpg.Pool, tmp_path: Path) -> None:
    log = await fill_log(own_pool)
    before = await export_file(own_pool, tmp_path / "before.ndjson")
    victim = log.streams[5]
    await tamper(own_database_url, "update events set data = jsonb_set(data, '{amount}', '999999') "
                          "where stream_id = $1 and version = 3", victim)

    expected = [("hash_mismatch", victim, 3, log.position(victim, 3))]
    whole = await verify_db(own_pool)
    assert breaks(whole) == expected and whole.events_checked == log.events
    assert breaks(await verify_db(own_pool, victim)) == expected
    assert (await verify_db(own_pool, log.streams[4])).ok
    assert breaks(await verify_path(await export_file(own_pool, tmp_path / "after.ndjson"))) == expected
    assert (await verify_path(before)).ok


@pytest.mark.parametrize("moment", ["infinity", "-infinity"])
async def test_an_infinite_recorded_at_is_pinpointed(own_database_url: str, own_pool: asyncpg.Pool, tmp_path: Path,
                                                    moment: str) -> None:
    """PostgreSQL takes an infinite timestamp that no append writes: it is one changed event, in the
    database and in the export, not a crash or an unreadable line."""
    log = await fill_log(own_pool)
    victim = log.streams[2]
    await tamper(own_database_url, f"update events set recorded_at = '{moment}' where stream_id = $1 and version = 2",
                 victim)
    expected = [("hash_mismatch", victim, 2, log.position(victim, 2))]
    assert breaks(await verify_db(own_pool)) == expected
    export = await export_file(own_pool, tmp_path / "after.ndjson")
    assert breaks(await verify_path(export)) == expected
    line = export.read_bytes().splitlines()[log.position(victim, 2) - 1]
    assert orjson.loads(line)["recorded_at"] == moment


async def test_deleted_event_is_pinpointed(own_database_url: str, own_pool: asyncpg.Pool, tmp_path: Path) -> None:
    log = await fill_log(own_pool)
    before = await export_file(own_pool, tmp_path / "before.ndjson")
    victim = log.streams[2]
    deleted, next_position = log.position(victim, 4), log.position(victim, 5)
    await tamper(own_database_url, "delete from events where stream_id = $1 and version = 4", victim)

    whole = await verify_db(own_pool)
    assert breaks(whole) == [
        ("missing_position", None, None, deleted),
        ("missing_version", victim, 4, next_position),
        ("broken_link", victim, 5, next_position),
    ]
    assert whole.breaks[1].as_dict() == {"stream_id": victim, "version": 4, "position": next_position,
                                         "kind": "missing_version", "expected": 4, "found": 5}
    assert breaks(await verify_db(own_pool, victim)) == [
        ("missing_version", victim, 4, next_position),
        ("broken_link", victim, 5, next_position),
    ]
    assert (await verify_path(before)).ok


async def test_swapped_events_are_pinpointed(own_database_url: str, own_pool: asyncpg.Pool, tmp_path: Path) -> None:
    log = await fill_log(own_pool)
    before = await export_file(own_pool, tmp_path / "before.ndjson")
    victim = log.streams[7]
    await tamper(own_database_url, """
        update events e set data = o.data
        from events o
        where e.stream_id = $1 and o.stream_id = $1 and (e.version, o.version) in ((2, 4), (4, 2))
    """, victim)

    expected = [("hash_mismatch", victim, 2, log.position(victim, 2)),
                ("hash_mismatch", victim, 4, log.position(victim, 4))]
    assert breaks(await verify_db(own_pool)) == expected
    assert breaks(await verify_db(own_pool, victim)) == expected
    assert (await verify_path(before)).ok


async def test_a_rehashed_forgery_breaks_the_next_link(own_database_url: str, own_pool: asyncpg.Pool) -> None:
    """Recomputing the forged event's own hash only moves the break to the stream's next event."""
    log = await fill_log(own_pool)
    victim = log.streams[0]
    await tamper(own_database_url, "update events set data = jsonb_set(data, '{amount}', '1') "
                          "where stream_id = $1 and version = 2", victim)
    forged = (await verify_db(own_pool, victim)).breaks[0]
    assert (forged.kind, forged.version) == ("hash_mismatch", 2)
    await tamper(own_database_url, "update events set hash = decode($2, 'hex') where stream_id = $1 and version = 2",
                 victim, forged.expected)
    assert breaks(await verify_db(own_pool, victim)) == [("hash_mismatch", victim, 3, log.position(victim, 3))]


async def test_the_immutability_trigger_is_what_the_tampering_gets_around(own_pool: asyncpg.Pool) -> None:
    await fill_log(own_pool, streams=1, versions=1)
    with pytest.raises(asyncpg.RestrictViolationError, match="immutable"):
        await own_pool.execute("update events set data = '{}'::jsonb")


# ---------------------------------------------------------------- export files, no database


def rewrite(path: Path, edit: Any) -> Path:
    lines = path.read_bytes().splitlines(keepends=True)
    out = path.with_name("edited-" + path.name)
    out.write_bytes(b"".join(edit(lines)))
    return out


def change(line: bytes, **fields: Any) -> bytes:
    event = orjson.loads(line)
    event["data"].update(fields)
    return orjson.dumps(event) + b"\n"


async def test_tampered_export_files_are_pinpointed(own_pool: asyncpg.Pool, tmp_path: Path) -> None:
    log = await fill_log(own_pool, streams=3, versions=4)
    path = await export_file(own_pool, tmp_path / "log.ndjson")
    stream = orjson.loads(path.read_bytes().splitlines()[4])["stream_id"]  # position 5: version 2
    assert log.position(stream, 2) == 5

    def amount(lines: list[bytes]) -> list[bytes]:
        return [change(line, amount=1) if n == 4 else line for n, line in enumerate(lines)]

    assert breaks(await verify_path(rewrite(path, amount))) == [("hash_mismatch", stream, 2, 5)]

    def drop(lines: list[bytes]) -> list[bytes]:
        return lines[:4] + lines[5:]

    assert breaks(await verify_path(rewrite(path, drop))) == [
        ("missing_position", None, None, 5), ("missing_version", stream, 2, 8), ("broken_link", stream, 3, 8)]

    def swap(lines: list[bytes]) -> list[bytes]:
        return [*lines[:4], lines[7], *lines[5:7], lines[4], *lines[8:]]

    swapped = await verify_path(rewrite(path, swap))
    assert ("position_out_of_order", stream, 2, 5) in breaks(swapped) and not swapped.ok

    def reorder_keys(lines: list[bytes]) -> list[bytes]:  # same content, other key order: still canonical
        return [orjson.dumps(dict(reversed(orjson.loads(line).items()))) + b"\n" for line in lines]

    assert (await verify_path(rewrite(path, reorder_keys))).ok


async def test_a_ranged_export_verifies_as_partial(own_pool: asyncpg.Pool, tmp_path: Path) -> None:
    await fill_log(own_pool, streams=3, versions=4)
    path = await export_file(own_pool, tmp_path / "tail.ndjson", after=5)
    partial = await verify_path(path, partial=True)
    assert partial.ok and partial.events_checked == 7 and partial.first_position == 6
    whole = breaks(await verify_path(path))
    assert whole[0] == ("missing_position", None, None, 1)
    assert [b[0] for b in whole].count("missing_position") == 1, "one gap before the first position, one break"


async def test_a_malformed_export_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.ndjson"
    path.write_bytes(b'{"position": 1}\n')
    with pytest.raises(ExportFormatError, match="line 1"):
        await verify_path(path)
