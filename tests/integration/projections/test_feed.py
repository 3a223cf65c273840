"""The feed of new events for a process's projection runners, filled by the process's one log tail: one
read serves every runner, each gets exactly what reading the store itself would give, across a failed
run of the tail, and a runner the feed cannot serve (behind it, or ahead of it) is told to read the
store itself."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.commands import wallets
from backend.commands.bus import Decide
from backend.commands.context import SYSTEM, CommandContext
from backend.domain.registry import wallet_stream
from backend.store.event_store import EventStore
from backend.store.events import ANY, NewEvent, RecordedEvent, Write
from backend.store.listener import Listener
from backend.store.tail import TASK, LogTail
from backend.supervisor import Supervisor
from projections.balances import Balances
from projections.deposits import Deposits
from projections.events import Event, read_to_head
from projections.feed import LogFeed
from tests.integration.projections.harness import Node
from tests.support import eventually

TYPES = ("A", "B", "C")


@contextlib.asynccontextmanager
async def fed(dsn: str, pool: asyncpg.Pool, *, page_size: int = 100, capacity: int = 1000,
              leading: bool = True) -> AsyncIterator[tuple[LogTail, LogFeed, Supervisor]]:
    """A process's listener and log tail, and a started feed on them, as while a runner leads unless
    `leading` is False (closed on the way out)."""
    listener = Listener(dsn, poll_interval_s=0.1)
    await listener.start()
    supervisor = Supervisor(min_delay_s=0.01, max_delay_s=0.05)
    tail = LogTail(pool, listener, page_size=page_size, idle_s=0.2, supervisor=supervisor)
    feed = LogFeed(tail, capacity=capacity)
    try:
        await feed.start()
        with feed.leading() if leading else contextlib.nullcontext():
            yield tail, feed, supervisor
    finally:
        feed.close()
        await tail.close()
        await supervisor.close()
        await listener.close()


async def append(pool: asyncpg.Pool, types: list[str]) -> int:
    store = EventStore(pool)
    try:
        for i, kind in enumerate(types):
            await store.append([Write(f"s-{i % 3}", ANY, [NewEvent(kind, {"i": i})])])
        return await store.head()
    finally:
        await store.close()


def positions(events: list[Event]) -> list[int]:
    return [e.position for e in events]


async def test_one_read_serves_every_runner_asking_at_once(own_database_url: str, own_pool: asyncpg.Pool) -> None:
    async with fed(own_database_url, own_pool) as (tail, feed, _):
        head = await append(own_pool, ["A", "B", "C", "A", "B"])
        await eventually(lambda: feed.run.end == head)
        reads = tail.reads
        answers = [feed.after(0, 100, None), feed.after(0, 100, frozenset({"A"})),
                   feed.after(0, 100, frozenset({"B", "C"}))]
        assert [(positions(a[0]), a[1]) for a in answers if a is not None] == \
            [([1, 2, 3, 4, 5], 5), ([1, 4], 5), ([2, 3, 5], 5)]
        first = answers[0]
        assert first is not None
        assert feed.after(2, 2, None) == (first[0][2:4], 4)  # full: examined up to the last one
        assert feed.after(5, 100, None) == ([], 5)  # caught up: nothing new yet
        assert tail.reads == reads  # the runners' answers read nothing
        async with own_pool.acquire() as conn:
            assert first[0] == (await read_to_head(conn, 0, 100))[0]  # what the store itself gives


async def test_the_feed_takes_pages_only_while_a_runner_of_its_process_leads(
    own_database_url: str, own_pool: asyncpg.Pool
) -> None:
    """With several workers the runners of all but one stand by: their process's feed neither converts
    nor keeps the log; once a runner leads it joins at the tail's position, and no earlier."""
    async with fed(own_database_url, own_pool, leading=False) as (tail, feed, _):
        tail.want(tail.subscribe("hub", _ignore), True)  # another follower keeps the tail reading meanwhile
        standing_by = await append(own_pool, ["A", "B"])
        await eventually(lambda: tail.position == standing_by)
        assert feed.pages == 0 and feed.run.end == 0
        with feed.leading():
            assert feed.run.start == feed.run.end == standing_by
            with feed.leading():  # a second runner of the process leads as well
                pass
            led = await append(own_pool, ["C", "A"])
            await eventually(lambda: feed.run.end == led)
            found = feed.after(standing_by, 100, None)
            assert found is not None and positions(found[0]) == [led - 1, led]
            assert feed.after(0, 100, None) is None  # below where it joined: the runner reads the store
        pages = feed.pages
        later = await append(own_pool, ["B"])
        await eventually(lambda: tail.position == later)
        assert feed.pages == pages and feed.run.end == led


async def _ignore(after: int, events: list[RecordedEvent], end: int) -> None:
    return None


async def test_behind_or_ahead_of_the_feed_a_runner_reads_the_store_itself(
    own_database_url: str, own_pool: asyncpg.Pool
) -> None:
    await append(own_pool, ["A"] * 2)
    async with fed(own_database_url, own_pool, page_size=3, capacity=4) as (_, feed, _):
        assert (feed.run.start, feed.run.end) == (2, 2)  # joined at the head: what lies below is the store's
        assert feed.after(1, 10, None) is None
        head = await append(own_pool, ["A"] * 10)
        await eventually(lambda: feed.run.end == head)
        assert feed.after(head - 5, 10, None) is None  # trimmed away to stay within capacity
        found = feed.after(head - 2, 10, None)
        assert found is not None and positions(found[0]) == [head - 1, head]
        assert feed.after(head + 1, 10, None) is None  # ahead of the feed


async def test_a_failed_run_of_the_tail_neither_skips_nor_repeats_an_event(
    own_database_url: str, own_pool: asyncpg.Pool
) -> None:
    failing = True

    async def fail_once(after: int, events: list[RecordedEvent], end: int) -> None:
        nonlocal failing
        if failing and events:
            failing = False
            raise RuntimeError("another follower's handler failed")

    async with fed(own_database_url, own_pool, page_size=2) as (tail, feed, supervisor):
        tail.want(tail.subscribe("flaky", fail_once), True)
        head = await append(own_pool, ["A", "B", "C", "A", "B", "C", "A"])
        await eventually(lambda: feed.run.end == head)
        assert supervisor.tasks[TASK].restarts == 1
        found = feed.after(0, 100, None)
        assert found is not None and positions(found[0]) == list(range(1, head + 1))


async def test_a_waiting_runner_wakes_when_the_feed_moves(own_database_url: str, own_pool: asyncpg.Pool) -> None:
    async with fed(own_database_url, own_pool) as (_, feed, _):
        waiting = asyncio.ensure_future(feed.wait_beyond(feed.run.end, 30))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        head = await append(own_pool, ["A"])
        async with asyncio.timeout(10):
            await waiting
        assert feed.run.end == head


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log=st.lists(st.sampled_from(TYPES), min_size=1, max_size=40), seed=st.integers(0, 2**32))
async def test_the_feed_answers_what_the_store_answers(
    own_database_url: str, own_pool: asyncpg.Pool, log: list[str], seed: int
) -> None:
    """Runners at random positions, with random filters and limits, asking while the log grows: every
    answer equals reading the store to the head at that moment, and every answer's end is a true
    examined-up-to position (nothing of the runner's types between its last event and end is missing)."""
    rng = random.Random(seed)
    written = 0
    async with fed(own_database_url, own_pool, page_size=rng.choice([3, 7, 50]), capacity=50) as (_, feed, _), \
            own_pool.acquire() as conn:
        base = feed.run.end  # left by earlier examples
        while written < len(log):
            step = rng.randint(1, 8)
            appended = await append(own_pool, log[written:written + step])
            written = min(len(log), written + step)
            if rng.random() < 0.7:
                await eventually(lambda: feed.run.end == appended)  # noqa: B023 (awaited at once)
            for _ in range(3):
                types = rng.choice([None, frozenset({"A"}), frozenset({"B", "C"})])
                position, limit = base + rng.randint(0, written), rng.randint(1, 10)
                answer = feed.after(position, limit, types)
                if answer is None:
                    continue
                events, end = answer
                expected, head = await read_to_head(conn, position, 1000, sorted(types) if types else None)
                expected = [e for e in expected if e.position <= end]
                assert events == expected[:limit] and end <= head
                assert len(events) == limit or events == expected


async def test_runners_take_new_events_from_the_feed_and_read_alone_while_it_stands_still(node: Node) -> None:
    """Live, the runners apply what the process's one tail read and handed to the feed;
    with the tail stopped (as in its backoff) they read the store themselves and still reach the head."""
    service = await node.start([Deposits(), Balances()])
    feed = service.feed
    assert feed is not None
    await eventually(lambda: _true(all(r.state == "leading" for r in service.runners)), what="the runners to lead")
    wallet_id, repo = uuid4(), node.bus.repository
    ctx = CommandContext(SYSTEM)
    stream = [wallet_stream(wallet_id)]
    await node.bus.execute(ctx, stream, lambda c: wallets.open_wallet(repo, c, wallet_id, "a", "USD"))
    def credit(reference: str) -> Decide:
        return lambda c: wallets.credit(repo, c, wallet_id, 1, reference, None)

    for i in range(5):
        await node.bus.execute(ctx, stream, credit(f"c{i}"))
    names = [r.name for r in service.runners]
    await eventually(lambda: node.caught_up(names), what="the runners to reach the head")
    assert feed.pages > 0 and feed.run.end == await node.store.head()

    await node.core.tail.close()  # the feed stands still from here on
    pages = feed.pages
    for i in range(3):
        await node.bus.execute(ctx, stream, credit(f"d{i}"))
    await eventually(lambda: node.caught_up(names), what="the runners to reach the head without the tail")
    assert feed.pages == pages
    assert (await node.pool.fetchval("select balance from wallet_balances where wallet_id = $1", wallet_id)) == 8


async def _true(value: bool) -> bool:
    return value
