"""The shared feed of new events for a process's projection runners: one read serves every runner that
asks at once, each gets exactly what reading the store itself would give, and a runner the feed cannot
serve (behind it, or its shared read failed) is told to read the store itself."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.store.event_store import EventStore
from backend.store.events import ANY, NewEvent, Write
from projections.events import Event, read_to_head
from projections.feed import LogFeed
from tests.support import eventually

TYPES = ("A", "B", "C")


async def append(pool: asyncpg.Pool, types: list[str]) -> None:
    store = EventStore(pool)
    try:
        for i, kind in enumerate(types):
            await store.append([Write(f"s-{i % 3}", ANY, [NewEvent(kind, {"i": i})])])
    finally:
        await store.close()


def positions(events: list[Event]) -> list[int]:
    return [e.position for e in events]


def served(answer: tuple[list[Event], int] | None) -> tuple[list[Event], int]:
    """A feed's answer that is not None (None: the position is behind its window)."""
    assert answer is not None
    return answer


async def test_one_read_serves_every_runner_asking_at_once(own_pool: asyncpg.Pool) -> None:
    await append(own_pool, ["A", "B", "C", "A", "B"])
    feed = LogFeed(page_size=100, capacity=1000)
    conns = [await own_pool.acquire() for _ in range(3)]
    try:
        answers = [served(answer) for answer in await asyncio.gather(
            feed.after(conns[0], 0, 100, None),
            feed.after(conns[1], 0, 100, frozenset({"A"})),
            feed.after(conns[2], 0, 100, frozenset({"B", "C"})),
        )]
    finally:
        for conn in conns:
            await own_pool.release(conn)
    assert feed.reads == 1
    assert [(positions(events), end) for events, end in answers] == [([1, 2, 3, 4, 5], 5), ([1, 4], 5), ([2, 3, 5], 5)]
    async with own_pool.acquire() as conn:
        assert await feed.after(conn, 2, 2, None) == (answers[0][0][2:4], 4)  # full: examined up to the last one
        assert await feed.after(conn, 5, 100, None) == ([], 5)  # caught up: looks again, finds nothing new
        assert feed.reads == 2


async def test_behind_the_feed_or_after_a_failed_read_a_runner_reads_the_store_itself(own_pool: asyncpg.Pool) -> None:
    await append(own_pool, ["A"] * 12)
    feed = LogFeed(page_size=4, capacity=4)
    async with own_pool.acquire() as conn:
        assert positions((await feed.after(conn, 6, 10, None) or ([], 0))[0]) == [7, 8, 9, 10]  # ahead: restarts at 6
        assert await feed.after(conn, 5, 10, None) is None  # behind the feed's start
        assert positions((await feed.after(conn, 10, 10, None) or ([], 0))[0]) == [11, 12]
        assert await feed.after(conn, 6, 10, None) is None  # trimmed away to stay within capacity

    await append(own_pool, ["B"])
    locker, reader, waiter = [await own_pool.acquire() for _ in range(3)]
    try:
        await locker.execute("begin; lock table events in access exclusive mode")
        failing = asyncio.ensure_future(feed.after(reader, 12, 10, None))  # its read waits for the lock
        await eventually(lambda: locker.fetchval("select wait_event_type = 'Lock' from pg_stat_activity where pid = $1",
                                                 reader.get_server_pid()), interval=0.01, what="the read to wait")
        waiting = asyncio.ensure_future(feed.after(waiter, 12, 10, None))  # waits for that read, not the lock
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await locker.execute("select pg_terminate_backend($1)", reader.get_server_pid())
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await failing
        assert await waiting is None  # the shared read failed: read the store yourself
        await locker.execute("rollback")
        found = await feed.after(waiter, 12, 10, None)  # the next read goes through
        assert found is not None and positions(found[0]) == [13]
    finally:
        for conn in (locker, reader, waiter):
            await own_pool.release(conn)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log=st.lists(st.sampled_from(TYPES), min_size=1, max_size=40), seed=st.integers(0, 2**32))
async def test_the_feed_answers_what_the_store_answers(own_pool: asyncpg.Pool, log: list[str], seed: int) -> None:
    """Runners at random positions, with random filters and limits, asking while the log grows: every
    answer equals reading the store to the head at that moment, and every answer's end is a true
    examined-up-to position (nothing of the runner's types between its last event and end is missing)."""
    async with own_pool.acquire() as conn:
        base = await conn.fetchval("select coalesce(max(position), 0) from events")  # left by earlier examples
    rng = random.Random(seed)
    feed = LogFeed(page_size=rng.choice([3, 7, 50]), capacity=50)
    written = 0
    async with own_pool.acquire() as conn:
        while written < len(log):
            step = rng.randint(1, 8)
            await append(own_pool, log[written:written + step])
            written = min(len(log), written + step)
            for _ in range(3):
                types = rng.choice([None, frozenset({"A"}), frozenset({"B", "C"})])
                position, limit = base + rng.randint(0, written), rng.randint(1, 10)
                answer = await feed.after(conn, position, limit, types)
                if answer is None:
                    continue
                events, end = answer
                expected, head = await read_to_head(conn, position, 1000, sorted(types) if types else None)
                expected = [e for e in expected if e.position <= end]
                assert events == expected[:limit] and end <= head
                assert len(events) == limit or events == expected
