"""The appender's one-round-trip (fenced) path: when it is taken, and that falling back loses nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from backend.audit.verify import verify_database
from backend.store.append import APPEND_LOCK_KEY
from backend.store.event_store import EventStore
from backend.store.events import (
    ANY,
    NO_STREAM,
    DuplicateEventId,
    NewEvent,
    PredecessorFailed,
    Write,
    WrongExpectedVersion,
)
from backend.store.idempotency import IdempotencyClaim, IdempotencyKeyUsed
from tests.support import advisory_lock_waiters, eventually


def sid() -> str:
    return f"fast-{uuid.uuid4()}"


def ev(n: int = 1) -> NewEvent:
    return NewEvent("Thing", {"n": n})


def claim(key: str) -> IdempotencyClaim:
    return IdempotencyClaim("scope", key, b"fp", b"outcome")


Stores = tuple[EventStore, EventStore]
"""Two stores on one database: this process's (`mine`) and another process's (`theirs`)."""


@pytest.fixture
async def stores(pool: asyncpg.Pool) -> AsyncIterator[Stores]:
    mine, theirs = EventStore(pool), EventStore(pool)
    try:
        yield mine, theirs
    finally:
        await mine.close()
        await theirs.close()


async def count_stream(pool: asyncpg.Pool, stream_id: str) -> int:
    return int(await pool.fetchval("select count(*) from events where stream_id = $1", stream_id))


async def test_a_taken_event_id_on_the_fast_path_falls_back_and_is_told_apart(
    store: EventStore, pool: asyncpg.Pool
) -> None:
    stream = sid()
    first = ev()
    original = await store.append_to(stream, NO_STREAM, [first])
    await store.append_to(stream, 1, [ev(2)])
    fenced, misses = store.counters().fenced, store.counters().fence_misses

    again = await store.append_to(stream, ANY, [first])  # the fast path plans an insert: the index refuses it
    assert again.replayed and again.streams == original.streams
    changed = NewEvent("Thing", {"n": 99}, event_id=first.event_id)
    with pytest.raises(DuplicateEventId, match="different content"):
        await store.append_to(stream, ANY, [changed])
    assert store.counters().fence_misses - misses == 2
    assert store.counters().fenced == fenced
    assert await count_stream(pool, stream) == 2
    await store.append_to(stream, 2, [ev(3)])  # and the fast path is back
    assert store.counters().fenced == fenced + 1


async def test_a_used_idempotency_key_on_the_fast_path_is_refused_and_appends_nothing(
    store: EventStore, pool: asyncpg.Pool
) -> None:
    stream, key = sid(), uuid.uuid4().hex
    await store.append_to(stream, NO_STREAM, [ev()])
    first = await store.append([Write(stream, 1, [ev(2)])], claim(key))
    misses = store.counters().fence_misses
    with pytest.raises(IdempotencyKeyUsed) as used:
        await store.append([Write(stream, 2, [ev(3)])], claim(key))
    assert used.value.stored.position == first.position
    assert store.counters().fence_misses == misses + 1
    assert await count_stream(pool, stream) == 2


async def test_a_read_at_the_appenders_own_head_opens_the_fast_path(stores: Stores) -> None:
    """Another process's stream, read after this process's last append, can be appended in one round trip."""
    mine, theirs = stores
    foreign, own = sid(), sid()
    await theirs.append_to(foreign, NO_STREAM, [ev(), ev(2)])
    await mine.append_to(own, NO_STREAM, [ev()])  # general path; the log is now where `mine` left it
    assert await mine.stream_version(foreign) == 2
    fenced = mine.counters().fenced
    await mine.append_to(foreign, 2, [ev(3)])
    assert mine.counters().fenced == fenced + 1

    # A read made after someone else appended teaches the stream's head, not the log's: the fence on
    # the stream (checked in the database) lets the append go in one round trip, further on.
    await theirs.append_to(foreign, 3, [ev(4)])
    await theirs.append_to(sid(), NO_STREAM, [ev()])
    assert await mine.stream_version(foreign) == 4
    before, locked = mine.counters(), mine.counters().locked_paths
    await mine.append_to(foreign, 4, [ev(5)])
    assert (mine.counters().fenced, mine.counters().fenced_shifted) == (before.fenced + 1, before.fenced_shifted + 1)
    assert mine.counters().locked_paths == locked
    assert [e.version for e in await mine.read_stream(foreign)] == [1, 2, 3, 4, 5]

    # What it read is checked, not trusted: once the stream moved again, the fence misses and the
    # general path answers (a version refusal from memory stands only for `fresh` appends).
    await theirs.append_to(foreign, 5, [ev(6)])
    misses = mine.counters().fence_misses
    with pytest.raises(WrongExpectedVersion):
        await mine.append_to(foreign, 5, [ev(7)])
    assert mine.counters().fence_misses == misses + 1
    assert [e.version for e in await mine.read_stream(foreign)] == [1, 2, 3, 4, 5, 6]


async def test_a_tail_read_opens_the_fast_path_too(stores: Stores) -> None:
    mine, theirs = stores
    foreign = sid()
    await theirs.append_to(foreign, NO_STREAM, [ev(), ev(2)])
    await mine.append_to(sid(), NO_STREAM, [ev()])
    assert [e.version for e in await mine.read_tail(foreign, 1)] == [2]
    fenced = mine.counters().fenced
    await mine.append_to(foreign, 2, [ev(3)])
    assert mine.counters().fenced == fenced + 1


async def test_a_caller_cancelled_while_appending_alone_leaves_the_store_usable(
    store: EventStore, pool: asyncpg.Pool
) -> None:
    """With nothing to batch with, a caller runs its append itself; cancelling it mid-flight must not
    wedge the appender, and whatever the database did, the log stays exact."""
    stream = sid()
    await store.append_to(stream, NO_STREAM, [ev()])
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("select pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        stuck = asyncio.create_task(store.append_to(stream, 1, [ev(2)]))
        await eventually(lambda: advisory_lock_waiters(pool), timeout=5, interval=0.01,
                         what="the append to reach the lock")
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
    version = await store.stream_version(stream)
    assert version in (1, 2)
    result = await store.append_to(stream, version, [ev(3)])
    assert result.streams[0].version == version + 1
    assert [e.version for e in await store.read_stream(stream)] == list(range(1, version + 2))


async def test_queued_appends_decided_on_a_failed_one_fail_with_it_not_with_their_own_batch(
    store: EventStore, pool: asyncpg.Pool
) -> None:
    """Appends decided on the state of one that fails fail as it settles, without waiting a batch of
    their own: a caller deciding again would otherwise chain on them, or wait for them."""
    stream, other = sid(), sid()
    await store.append_to(stream, NO_STREAM, [ev()])
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("select pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        doomed = store.submit([Write(stream, NO_STREAM, [ev(2)])])  # stale, and not refused from memory: it waits
        await eventually(lambda: advisory_lock_waiters(pool), timeout=5, interval=0.01,
                         what="the doomed append's batch to reach the lock")
        chained = store.submit([Write(stream, 1, [ev(3)])], after=[doomed], fresh=True)  # fine on its own
        again = store.submit([Write(other, NO_STREAM, [ev(4)])], after=[chained], fresh=True)
        unrelated = store.submit([Write(sid(), NO_STREAM, [ev(5)])], fresh=True)
    with pytest.raises(WrongExpectedVersion):
        await store.outcome(doomed)
    # At once: the batch that would have refused them has not run (the unrelated append is still queued).
    assert isinstance(chained.outcome, PredecessorFailed) and isinstance(again.outcome, PredecessorFailed)
    assert unrelated.outcome is None
    for refused in (chained, again):
        with pytest.raises(PredecessorFailed):
            await store.outcome(refused)
    assert (await store.outcome(unrelated)).streams[0].version == 1
    assert await store.stream_version(stream) == 1 and await store.stream_version(other) == 0


async def test_a_queued_caller_cancelled_before_its_batch_runs_is_still_appended(
    store: EventStore, pool: asyncpg.Pool
) -> None:
    """A queued append goes on when its caller is cancelled (its outcome is then simply not awaited);
    the appender settles the rest of the batch and stays usable."""
    first, queued = sid(), sid()
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("select pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        running = asyncio.create_task(store.append_to(first, NO_STREAM, [ev()]))
        await eventually(lambda: advisory_lock_waiters(pool), timeout=5, interval=0.01,
                         what="the first append to reach the lock")
        cancelled = asyncio.create_task(store.append_to(queued, NO_STREAM, [ev()]))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    assert (await running).streams[0].version == 1
    await eventually(lambda: count_stream(pool, queued), timeout=5, interval=0.01,
                     what="the queued append to commit")
    assert await count_stream(pool, queued) == 1
    result = await store.append_to(queued, 1, [ev(2)])
    assert result.streams[0].version == 2


async def test_a_held_connection_asyncpg_took_back_is_replaced_not_used(
    store: EventStore, pool: asyncpg.Pool
) -> None:
    """After a server restart asyncpg hands the batcher's idle connection back to the pool, and the
    termination listener that tells the batcher runs a loop iteration later; a batch that comes first
    must take a new connection, not fail with "released back to the pool" (a 500)."""
    stream = sid()
    await store.append_to(stream, NO_STREAM, [ev()])
    held = store._batcher._conn  # the state a restart leaves behind, made without the race
    assert held is not None
    await pool.release(held)
    result = await store.append_to(stream, 1, [ev(2)])
    assert result.streams[0].version == 2
    assert await count_stream(pool, stream) == 2


async def test_a_new_stream_takes_the_fast_path_and_one_that_exists_is_told_by_the_general_path(
    stores: Stores, pool: asyncpg.Pool,
) -> None:
    mine, theirs = stores
    taken = sid()
    await theirs.append_to(taken, NO_STREAM, [ev()])  # before `mine` knows anything
    await mine.append_to(sid(), NO_STREAM, [ev()])  # general path: `mine` learns the head
    fenced = mine.counters().fenced
    await mine.append_to(sid(), NO_STREAM, [ev()])
    assert mine.counters().fenced == fenced + 1
    locked = mine.counters().locked_paths["taken"]  # `taken` is not known, so taken as new: the index refuses
    with pytest.raises(WrongExpectedVersion):
        await mine.append_to(taken, NO_STREAM, [ev()])
    assert mine.counters().locked_paths["taken"] == locked + 1
    assert await count_stream(pool, taken) == 1


async def test_in_one_batch_what_memory_cannot_plan_goes_the_general_way_and_the_rest_in_one_trip(
    stores: Stores,
) -> None:
    """`mine` knows both streams at version 1; another process moved one. The fence misses, the miss
    tells both streams' heads: the request on the moved one is left to the general path, which refuses
    it, and the other is appended on the fenced path."""
    mine, theirs = stores
    still, moved = sid(), sid()
    await mine.append([Write(still, NO_STREAM, [ev()]), Write(moved, NO_STREAM, [ev()])])
    await theirs.append_to(moved, 1, [ev(2)])
    before = mine.counters()
    fenced, misses, rejected = before.fenced, before.fence_misses, before.locked_paths["rejected"]
    first = mine.submit([Write(still, 1, [ev(2)])])
    second = mine.submit([Write(moved, 1, [ev(3)])])  # queued behind the first: one batch
    ok, refused = await asyncio.gather(mine.outcome(first), mine.outcome(second), return_exceptions=True)
    assert isinstance(refused, WrongExpectedVersion), refused
    assert not isinstance(ok, BaseException) and ok.streams[0].version == 2
    assert mine.counters().fenced == fenced + 1 and mine.counters().fence_misses == misses + 1
    assert mine.counters().locked_paths["rejected"] == rejected + 1
    assert [e.version for e in await mine.read_stream(moved)] == [1, 2]
    assert [e.version for e in await mine.read_stream(still)] == [1, 2]


async def test_following_the_log_keeps_the_fence_after_another_process_appended(stores: Stores) -> None:
    mine, theirs = stores
    own, shared = sid(), sid()
    await mine.append([Write(own, NO_STREAM, [ev()]), Write(shared, NO_STREAM, [ev()])])
    head = await mine.head()
    await theirs.append([Write(sid(), NO_STREAM, [ev()]), Write(shared, 1, [ev(2)])])
    events = await mine.read_all(head)
    assert mine.follow(events, events[-1].position)
    assert not mine.follow(events, events[-1].position)  # had them already
    fenced, misses = mine.counters().fenced, mine.counters().fence_misses
    await mine.append([Write(shared, 2, [ev(3)]), Write(own, 1, [ev(2)])])
    assert (mine.counters().fenced, mine.counters().fence_misses) == (fenced + 1, misses)
    assert [e.version for e in await mine.read_stream(shared)] == [1, 2, 3]


async def test_appends_elsewhere_by_another_process_shift_the_batch_in_one_round_trip(
    stores: Stores, pool: asyncpg.Pool,
) -> None:
    """The log moved on but the batch's streams did not: the planned rows go in further on, in the one
    round trip, and the result and the idempotency record carry the positions they got."""
    mine, theirs = stores
    own, key = sid(), uuid.uuid4().hex
    await mine.append_to(own, NO_STREAM, [ev()])
    await theirs.append([Write(sid(), NO_STREAM, [ev(), ev(2)]), Write(sid(), NO_STREAM, [ev(3)])])
    before, locked = mine.counters(), mine.counters().locked_paths
    result = await mine.append([Write(own, 1, [ev(2), ev(3)])], claim(key))
    after = mine.counters()
    assert (after.fenced, after.fence_misses, after.fenced_shifted) == \
        (before.fenced + 1, before.fence_misses, before.fenced_shifted + 1)
    assert mine.counters().locked_paths == locked
    stored = await mine.read_stream(own)
    assert [(e.version, e.position) for e in stored[1:]] == list(zip((2, 3), result.streams[0].positions, strict=True))
    assert result.position == await mine.head()
    record = await mine.stored_outcome("scope", key)
    assert record is not None and record.position == result.position
    rows = await pool.fetch("select position from events order by position")
    assert [r["position"] for r in rows] == list(range(1, len(rows) + 1))  # no gap


async def test_a_fresh_append_expecting_a_version_below_the_known_one_is_refused_from_memory(
    stores: Stores,
) -> None:
    """Versions only grow: expecting one below what this process knows the stream reached can never
    succeed, so a request whose caller decides again (`fresh`) is refused without the locked path. One
    that is not fresh might be a replay of stored events, and still asks the database."""
    mine, _ = stores
    stream = sid()
    await mine.append_to(stream, NO_STREAM, [ev()])
    await mine.append_to(stream, 1, [ev(2)])
    before, locked = mine.counters(), mine.counters().locked_paths
    with pytest.raises(WrongExpectedVersion):
        await mine.outcome(mine.submit([Write(stream, 1, [ev(3)])], claim(uuid.uuid4().hex), fresh=True))
    assert mine.counters().locked_paths == locked
    assert mine.counters().fence_misses == before.fence_misses
    with pytest.raises(WrongExpectedVersion):
        await mine.outcome(mine.submit([Write(stream, 1, [ev(3)])]))
    assert mine.counters().locked_paths["rejected"] == locked["rejected"] + 1
    assert [e.version for e in await mine.read_stream(stream)] == [1, 2]


async def fenced_append(pool: asyncpg.Pool, expected_head: int, recorded_at: object, origins: dict[str, list[object]],
                        rows: list[list[object]]) -> object:
    return await pool.fetchval("select tally_append_on_streams($1, $2, $3, $4::jsonb, $5::jsonb, '[]'::jsonb)",
                               APPEND_LOCK_KEY, expected_head, recorded_at, origins, rows)


async def test_the_stream_fence_misses_when_a_stream_or_the_time_moved(store: EventStore, pool: asyncpg.Pool) -> None:
    """The function itself (migration 0010): a moved stream, a different hash at the same version, or a
    later recorded_at in the log answer the miss and write nothing."""
    stream = sid()
    await store.append_to(stream, NO_STREAM, [ev()])
    last = (await store.read_stream(stream))[-1]
    await store.append_to(sid(), NO_STREAM, [ev()])  # the head moves on, elsewhere
    head = await store.head()
    planned_head = head - 1
    row = [planned_head + 1, stream, 2, "Thing", {"n": 2}, {}, str(uuid.uuid4()), last.recorded_at.isoformat(),
           "00" * 32]
    later = last.recorded_at.replace(year=last.recorded_at.year + 1)
    for origins, recorded_at in (
        ({stream: [0, "00" * 32]}, later),  # the stream is not new
        ({stream: [1, "11" * 32]}, later),  # same version, another history
        ({stream: [1, last.hash.hex()]}, last.recorded_at.replace(year=last.recorded_at.year - 1)),  # time went back
    ):
        miss = await fenced_append(pool, planned_head, recorded_at, origins, [row])
        assert isinstance(miss, dict) and miss["head"] == head, miss
        assert miss["streams"] == {stream: [1, last.hash.hex()]}
    assert await store.head() == head


async def test_two_processes_racing_on_shared_streams_keep_every_chain_and_record_exact(
    stores: Stores, pool: asyncpg.Pool,
) -> None:
    """Two stores append at once to four shared streams, each append with an Idempotency-Key and a
    version it read: batches go in where planned, further on (shifted), or miss and are planned again.
    Every stream's versions and hash chain stay whole, positions are unique, and every record keeps the
    position its append got."""
    streams = [sid() for _ in range(4)]
    got: list[tuple[str, int, str]] = []

    async def one(store: EventStore, n: int) -> None:
        stream, key = streams[n % len(streams)], uuid.uuid4().hex
        for _ in range(200):
            version = await store.stream_version(stream)
            request = store.submit([Write(stream, version, [ev(n)])], claim(key), fresh=True)
            try:
                result = await store.outcome(request)
            except WrongExpectedVersion:
                continue
            got.append((stream, result.position, key))
            return
        raise AssertionError("never appended")

    mine, theirs = stores
    await asyncio.gather(*(one(store, n) for n in range(40) for store in (mine, theirs)))
    assert mine.counters().fenced_shifted + theirs.counters().fenced_shifted > 0
    async with pool.acquire() as conn:
        for stream in streams:
            report = await verify_database(conn, stream)
            assert report.ok and report.events_checked == 20, [b.as_dict() for b in report.breaks]
    assert len({position for _, position, _ in got}) == len(got) == 80
    for stream, position, key in got:
        record = await mine.stored_outcome("scope", key)
        assert record is not None and record.position == position
        assert [e.stream_id for e in await mine.read_all(position - 1, 1)] == [stream]
