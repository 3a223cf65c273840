"""The event store's contract: the same test functions against the PostgreSQL store and against the
in-memory one the unit tests run the command handlers over (fixture `any_store`); then what only the
PostgreSQL store promises (immutable rows, purging, shared point reads, two processes appending)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import orjson
import pytest

from backend.store import idempotency
from backend.store.event_store import EventStore
from backend.store.events import (
    ANY,
    NO_STREAM,
    DuplicateEventId,
    InvalidEvent,
    NewEvent,
    PredecessorFailed,
    Write,
    WrongExpectedVersion,
)
from backend.store.hashing import GENESIS, canonical_bytes, encode_data, event_hash, format_time
from backend.store.idempotency import IdempotencyClaim, IdempotencyKeyUsed
from backend.store.interface import EventLog
from tests.memory_store import MemoryEventStore


def sid(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4()}"


def ev(type_: str = "Thing", **data: object) -> NewEvent:
    return NewEvent(type_, data or {"n": 1})


@pytest.fixture(params=["postgresql", "memory"])
def any_store(request: pytest.FixtureRequest) -> EventLog:
    """Each store the contract holds for: the production one, and the unit tests' in-memory one."""
    if request.param == "memory":
        return MemoryEventStore()
    store: EventStore = request.getfixturevalue("store")
    return store


async def count_stream(store: EventLog, stream_id: str) -> int:
    return len(await store.read_stream(stream_id))


async def test_append_and_read_back_a_stream(any_store: EventLog) -> None:
    stream = sid()
    first = await any_store.append_to(stream, NO_STREAM, [ev(n=1), ev(n=2)])
    assert first.streams[0].version == 2
    second = await any_store.append_to(stream, 2, [ev("Other", n=3)])
    assert second.position == first.position + 1
    events = await any_store.read_stream(stream)
    assert [(e.version, e.type, e.data["n"]) for e in events] == [(1, "Thing", 1), (2, "Thing", 2), (3, "Other", 3)]
    assert [e.position for e in events] == [*first.streams[0].positions, second.position]
    assert [e.version for e in await any_store.read_stream(stream, after_version=1, to_version=2)] == [2]
    assert await any_store.stream_version(stream) == 3
    assert await any_store.head() >= second.position


async def test_expected_versions_no_stream_any_and_stale(any_store: EventLog) -> None:
    stream = sid()
    await any_store.append_to(stream, NO_STREAM, [ev()])
    with pytest.raises(WrongExpectedVersion) as stale:
        await any_store.append_to(stream, NO_STREAM, [ev()])
    assert (stale.value.stream_id, stale.value.expected, stale.value.actual) == (stream, 0, 1)
    assert stream in str(stale.value)
    with pytest.raises(WrongExpectedVersion):
        await any_store.append_to(stream, 5, [ev()])
    result = await any_store.append_to(stream, ANY, [ev()])
    assert result.streams[0].version == 2
    assert (await any_store.append_to(sid(), ANY, [ev()])).streams[0].version == 1


async def test_multi_stream_append_is_atomic(any_store: EventLog) -> None:
    a, b = sid(), sid()
    await any_store.append_to(b, NO_STREAM, [ev()])
    with pytest.raises(WrongExpectedVersion) as conflict:
        await any_store.append([Write(a, NO_STREAM, [ev()]), Write(b, NO_STREAM, [ev()])])
    assert conflict.value.stream_id == b
    assert await count_stream(any_store, a) == 0
    both = await any_store.append([Write(a, NO_STREAM, [ev()]), Write(b, 1, [ev(), ev()])])
    assert [(s.stream_id, s.version) for s in both.streams] == [(a, 1), (b, 3)]
    positions = [p for s in both.streams for p in s.positions]
    assert positions == list(range(positions[0], positions[0] + 3))


async def test_reappending_stored_event_ids_is_idempotent(any_store: EventLog) -> None:
    stream = sid()
    events = [NewEvent("Thing", {"n": 1}), NewEvent("Thing", {"n": 2})]
    original = await any_store.append_to(stream, NO_STREAM, events)
    again = await any_store.append_to(stream, NO_STREAM, events)  # stale version, but a replay wins
    assert again.replayed
    assert again.streams == original.streams
    assert await count_stream(any_store, stream) == 2

    changed = NewEvent("Thing", {"n": 99}, event_id=events[0].event_id)
    with pytest.raises(DuplicateEventId, match="different content"):
        await any_store.append_to(stream, ANY, [changed])
    with pytest.raises(DuplicateEventId, match="other events"):
        await any_store.append_to(stream, ANY, [events[0], NewEvent("Thing", {"n": 3})])
    assert await count_stream(any_store, stream) == 2


async def test_concurrent_appends_with_one_expected_version_have_one_winner(any_store: EventLog) -> None:
    stream = sid()
    await any_store.append_to(stream, NO_STREAM, [ev()])
    outcomes = await asyncio.gather(
        *(any_store.append_to(stream, 1, [ev(n=i)]) for i in range(50)), return_exceptions=True
    )
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    losers = [o for o in outcomes if isinstance(o, WrongExpectedVersion)]
    assert len(winners) == 1
    assert len(losers) == 49
    assert all(loser.actual == 2 for loser in losers)
    assert await any_store.stream_version(stream) == 2


async def test_a_conflict_in_a_batch_fails_only_its_own_request(any_store: EventLog) -> None:
    streams = [sid() for _ in range(40)]
    taken = streams[::4]
    for stream in taken:
        await any_store.append_to(stream, NO_STREAM, [ev()])
    batches_before = any_store.counters().batches
    outcomes = await asyncio.gather(
        *(any_store.append_to(stream, NO_STREAM, [ev()]) for stream in streams), return_exceptions=True
    )
    failed = {streams[i] for i, o in enumerate(outcomes) if isinstance(o, WrongExpectedVersion)}
    assert failed == set(taken)
    assert all(not isinstance(o, BaseException) for s, o in zip(streams, outcomes, strict=True) if s not in failed)
    # 40 concurrent calls went through far fewer transactions than calls.
    assert any_store.counters().batches - batches_before < 40


async def test_big_payloads_and_unicode_stream_ids(any_store: EventLog) -> None:
    stream = f"wallet-ünïcødé-钱包-{uuid.uuid4()}-💰"
    big = {"blob": "x" * 1_000_000, "text": "naïve café ☕ 𝄞", "nested": {"b": [1, 2, {"c": None}], "a": True}}
    result = await any_store.append_to(stream, NO_STREAM, [NewEvent("Big", big)])
    [stored] = await any_store.read_stream(stream)
    assert stored.stream_id == stream
    assert stored.data == big
    assert stored.position == result.position


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (Write("", NO_STREAM, [ev()]), "stream_id"),
        (Write("x" * 300, NO_STREAM, [ev()]), "stream_id"),
        (Write("a\x00b", NO_STREAM, [ev()]), "NUL"),
        (Write("s", -2, [ev()]), "expected_version"),
        (Write("s", NO_STREAM, []), "no events"),
        (Write("s", NO_STREAM, [NewEvent("", {})]), "type"),
        (Write("s", NO_STREAM, [NewEvent("T", {"amount": 1.5})]), "floats"),
        (Write("s", NO_STREAM, [NewEvent("T", {"amount": 2**64})]), "64-bit"),
        (Write("s", NO_STREAM, [NewEvent("T", {"t": "a\x00"})]), "NUL"),
        (Write("s", NO_STREAM, [NewEvent("T", ["not", "an", "object"])]), "JSON object"),  # type: ignore[arg-type]
        (Write("s", NO_STREAM, [NewEvent("T", {"when": object()})]), "not a JSON value"),
    ],
)
async def test_bad_input_is_rejected_clearly_and_stores_nothing(
    any_store: EventLog, write: Write, message: str
) -> None:
    head = await any_store.head()
    with pytest.raises(InvalidEvent, match=message):
        await any_store.append([write])
    assert await any_store.head() == head


async def test_duplicate_event_ids_within_one_call_are_rejected(any_store: EventLog) -> None:
    event = ev()
    with pytest.raises(InvalidEvent, match="twice"):
        await any_store.append([Write(sid(), NO_STREAM, [event]), Write(sid(), NO_STREAM, [event])])


async def test_read_all_filters_and_pages(any_store: EventLog) -> None:
    prefix = f"cat{uuid.uuid4().hex[:8]}-"
    start = await any_store.head()
    for i in range(5):
        await any_store.append_to(f"{prefix}{i}", NO_STREAM, [ev("A"), ev("B")])
    await any_store.append_to(sid("elsewhere"), NO_STREAM, [ev("A")])

    mine = await any_store.read_all(start, limit=100, stream_prefix=prefix)
    assert len(mine) == 10
    assert [e.position for e in mine] == sorted(e.position for e in mine)
    only_b = await any_store.read_all(start, limit=100, types=["B"], stream_prefix=prefix)
    assert [e.type for e in only_b] == ["B"] * 5
    assert len(await any_store.read_all(start, limit=100, types=["A"])) == 6
    assert len(await any_store.read_all(start, limit=3)) == 3
    paged = [e.position async for e in any_store.iter_all(start, stream_prefix=prefix, page_size=3)]
    assert paged == [e.position for e in mine]
    bounded = [e.position async for e in any_store.iter_all(start, page_size=2, to_position=mine[3].position)]
    assert bounded[-1] == mine[3].position
    assert len([e async for e in any_store.iter_stream(f"{prefix}0")]) == 2
    # a prefix with LIKE wildcards is taken literally
    assert await any_store.read_all(start, stream_prefix="cat%") == []


async def test_positions_are_gap_free_and_in_order(any_store: EventLog) -> None:
    """Concurrent appends to many streams: from where the log stood, every position once, in order, and
    each stream's versions counting up from 1 along it."""
    start = await any_store.head()
    streams = [sid() for _ in range(8)]
    await asyncio.gather(*(any_store.append_to(stream, ANY, [ev(n=i), ev(n=i)])
                           for i in range(5) for stream in streams))
    log = [e async for e in any_store.iter_all(start, page_size=7)]
    assert [e.position for e in log] == list(range(start + 1, start + 81))
    assert await any_store.head() == start + 80
    for stream in streams:
        mine = [e for e in log if e.stream_id == stream]
        assert [e.version for e in mine] == list(range(1, 11))
        assert await any_store.read_stream(stream) == mine


async def test_an_append_decided_after_another_commits_only_if_that_one_did(any_store: EventLog) -> None:
    """`after`: what the repository's optimistic attempts rely on, settling in submission order."""
    stream, other = sid(), sid()
    await any_store.append_to(stream, NO_STREAM, [ev()])
    settled: list[object] = []
    doomed = any_store.submit([Write(stream, NO_STREAM, [ev()])], on_settle=settled.append)  # stale
    chained = any_store.submit([Write(other, NO_STREAM, [ev()])], after=[doomed])  # fine on its own
    unrelated = any_store.submit([Write(sid(), NO_STREAM, [ev()])])
    with pytest.raises(WrongExpectedVersion):
        await any_store.outcome(doomed)
    assert settled == [doomed] and not doomed.committed
    with pytest.raises(PredecessorFailed):
        await any_store.outcome(chained)
    assert (await any_store.outcome(unrelated)).streams[0].version == 1
    assert await any_store.stream_version(other) == 0

    first = any_store.submit([Write(stream, 1, [ev()])])
    second = any_store.submit([Write(other, NO_STREAM, [ev()])], after=[first])
    await any_store.settled(second)
    assert first.committed and second.committed
    assert (await any_store.outcome(second)).streams[0].version == 1

async def test_hash_chain_is_recomputable_from_stored_rows(any_store: EventLog) -> None:
    stream = sid()
    await any_store.append_to(stream, NO_STREAM, [ev(n=1), ev("T2", n=2, text="é")])
    await any_store.append_to(stream, 2, [ev(n=3)])
    previous = GENESIS
    for event in await any_store.read_stream(stream):
        expected = event_hash(previous, event.stream_id, event.version, event.type, event.data, event.recorded_at)
        assert event.hash == expected
        previous = event.hash
        whole = {"data": event.data, "recorded_at": format_time(event.recorded_at), "stream_id": event.stream_id,
                 "type": event.type, "version": event.version}
        assert canonical_bytes(event.stream_id, event.version, event.type, encode_data(event.data),
                               event.recorded_at) == orjson.dumps(whole, option=orjson.OPT_SORT_KEYS)


async def test_recorded_at_never_goes_backwards(any_store: EventLog) -> None:
    start = await any_store.head()
    await asyncio.gather(*(any_store.append_to(sid(), NO_STREAM, [ev()]) for _ in range(30)))
    times = [e.recorded_at for e in await any_store.read_all(start)]
    assert len(times) == 30
    assert times == sorted(times)


@pytest.mark.parametrize(
    "statement",
    ["update events set type = 'X' where position = $1", "delete from events where position = $1",
     "truncate events"],
)
async def test_events_are_immutable(store: EventStore, pool: asyncpg.Pool, statement: str) -> None:
    result = await store.append_to(sid(), NO_STREAM, [ev()])
    args = [result.position] if "$1" in statement else []
    with pytest.raises(asyncpg.RestrictViolationError, match="immutable"):
        await pool.execute(statement, *args)
    assert len(await store.read_all(result.position - 1, limit=1)) == 1


def claim(key: str, body: bytes = b"ok", scope: str = "key-1") -> IdempotencyClaim:
    return IdempotencyClaim(scope, key, b"fp", body)


async def test_idempotency_claim_commits_with_events_and_blocks_a_second_use(any_store: EventLog) -> None:
    key = uuid.uuid4().hex
    stream = sid()
    first = await any_store.append([Write(stream, NO_STREAM, [ev()])], claim(key))
    stored = await any_store.stored_outcome("key-1", key)
    assert stored is not None
    assert (stored.outcome, stored.position) == (b"ok", first.position)
    with pytest.raises(IdempotencyKeyUsed) as used:
        await any_store.append([Write(sid(), NO_STREAM, [ev()])], claim(key))
    assert used.value.stored == stored
    # the same key under another scope is a different key
    await any_store.append([Write(sid(), NO_STREAM, [ev()])], claim(key, scope="key-2"))


async def test_concurrent_claims_of_one_key_append_once(any_store: EventLog) -> None:
    key = uuid.uuid4().hex
    streams = [sid() for _ in range(20)]
    outcomes = await asyncio.gather(
        *(any_store.append([Write(s, NO_STREAM, [ev()])], claim(key)) for s in streams), return_exceptions=True
    )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert sum(isinstance(o, IdempotencyKeyUsed) for o in outcomes) == 19
    counts = [await count_stream(any_store, s) for s in streams]
    assert sorted(counts) == [0] * 19 + [1]


async def test_claim_without_events_and_failed_append_leaves_key_free(any_store: EventLog) -> None:
    key = uuid.uuid4().hex
    stream = sid()
    await any_store.append_to(stream, NO_STREAM, [ev()])
    with pytest.raises(WrongExpectedVersion):
        await any_store.append([Write(stream, NO_STREAM, [ev()])], claim(key))
    assert await any_store.stored_outcome("key-1", key) is None
    outcome = await any_store.append([], claim(key, body=b"rejected"))
    assert outcome.streams == ()
    stored = await any_store.stored_outcome("key-1", key)
    assert stored is not None and (stored.outcome, stored.position) == (b"rejected", 0)


async def test_purge_drops_only_expired_idempotency_records(store: EventStore, pool: asyncpg.Pool) -> None:
    old, fresh = uuid.uuid4().hex, uuid.uuid4().hex
    await store.append([], claim(old))
    await store.append([], claim(fresh))
    await pool.execute("update idempotency_keys set created_at = now() - interval '49 hours' where key = $1", old)
    assert await idempotency.purge(pool, timedelta(hours=48)) >= 1
    assert await idempotency.lookup(pool, "key-1", old) is None
    assert await idempotency.lookup(pool, "key-1", fresh) is not None


async def test_concurrent_point_reads_share_queries_and_stay_exact(store: EventStore) -> None:
    streams = [sid() for _ in range(30)]
    for i, stream in enumerate(streams):
        await store.append_to(stream, NO_STREAM, [ev(n=k) for k in range(i % 4 + 1)])
    loads_before = store.counters().version_queries
    versions = await asyncio.gather(*(store.stream_version(s) for s in [*streams, sid()]))
    assert versions == [i % 4 + 1 for i in range(30)] + [0]
    assert store.counters().version_queries - loads_before < 31
    tails = await asyncio.gather(*(store.read_tail(s, 1) for s in streams), store.read_tail(streams[3], 0))
    assert [[e.version for e in t] for t in tails[:30]] == [list(range(2, i % 4 + 2)) for i in range(30)]
    assert [e.version for e in tails[30]] == [1, 2, 3, 4]


async def test_a_point_read_sees_writes_committed_before_it_was_asked(any_store: EventLog) -> None:
    stream = sid()
    for version in range(1, 30):
        reads = [asyncio.create_task(any_store.stream_version(stream)) for _ in range(3)]
        await any_store.append_to(stream, version - 1, [ev()])
        assert await any_store.stream_version(stream) == version
        assert all(v in (version - 1, version) for v in await asyncio.gather(*reads))


async def test_two_appenders_interleaving_keep_versions_and_chains_exact(pool: asyncpg.Pool) -> None:
    """Each appender caches stream heads for its one-round-trip path; the other's writes must void that cache."""
    one, two = EventStore(pool), EventStore(pool)
    streams = [sid() for _ in range(3)]
    try:
        for round_ in range(12):
            for stream in streams:
                writer = one if (round_ + len(stream)) % 3 else two
                await writer.append_to(stream, round_, [ev(n=round_)])
                # a stale expected version is still refused, whichever path the appender takes
                with pytest.raises(WrongExpectedVersion):
                    await (two if writer is one else one).append_to(stream, round_, [ev()])
        assert one.counters().fenced + two.counters().fenced > 0
        for stream in streams:
            previous = GENESIS
            events = await one.read_stream(stream)
            assert [e.version for e in events] == list(range(1, 13))
            for event in events:
                assert event.hash == event_hash(previous, stream, event.version, event.type, event.data,
                                                event.recorded_at)
                previous = event.hash
    finally:
        await one.close()
        await two.close()


async def test_a_cancelled_reader_does_not_strand_the_reads_it_was_loading(store: EventStore) -> None:
    stream = sid()
    await store.append_to(stream, NO_STREAM, [ev()])
    for _ in range(20):
        leader = asyncio.create_task(store.stream_version(stream))
        followers = [asyncio.create_task(store.stream_version(stream)) for _ in range(5)]
        await asyncio.sleep(0)
        leader.cancel()
        assert await asyncio.wait_for(asyncio.gather(*followers), 5) == [1] * 5
