"""The process's one log tail: every wanting subscriber gets each new event once, in order, even when
a subscriber's handler fails and the supervisor restarts the tail; a late one is told where it joins."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest

from backend.store.event_store import EventStore
from backend.store.events import ANY, NewEvent, RecordedEvent
from backend.store.listener import Listener
from backend.store.tail import TASK, LogTail, Receive
from backend.supervisor import Supervisor
from tests.support import eventually


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[Listener]:
    listening = Listener(database_url, poll_interval_s=0.1)
    await listening.start()
    try:
        yield listening
    finally:
        await listening.close()


async def append(store: EventStore, stream: str, count: int) -> list[int]:
    result = await store.append_to(stream, ANY, [NewEvent("Tick", {"n": n}) for n in range(count)])
    return [p for s in result.streams for p in s.positions]


class Recorder:
    def __init__(self, fail_once_at: int | None = None) -> None:
        self.calls: list[tuple[int, list[int]]] = []
        self.fail_once_at = fail_once_at

    async def receive(self, after: int, events: list[RecordedEvent], end: int) -> None:
        positions = [e.position for e in events]
        if self.fail_once_at is not None and self.fail_once_at in positions:
            self.fail_once_at = None
            raise RuntimeError("a subscriber's handler failed")
        self.calls.append((after, positions))

    def positions(self) -> list[int]:
        return [p for _, events in self.calls for p in events]


async def test_each_event_once_in_order_across_a_failed_handler(
    pool: asyncpg.Pool, store: EventStore, listener: Listener
) -> None:
    supervisor = Supervisor(min_delay_s=0.01, max_delay_s=0.05)
    tail = LogTail(pool, listener, page_size=3, idle_s=0.2, supervisor=supervisor)
    steady, flaky = Recorder(), Recorder()
    for name, recorder in (("steady", steady), ("flaky", flaky)):
        tail.want(tail.subscribe(name, recorder.receive), True)
    await tail.start()
    try:
        stream = f"tail-{uuid.uuid4()}"
        first = await append(store, stream, 4)
        flaky.fail_once_at = first[-1]
        appended = first + await append(store, stream, 5)
        await eventually(lambda: steady.positions()[-1:] == appended[-1:] and flaky.positions()[-1:] == appended[-1:])
        assert supervisor.tasks[TASK].restarts == 1
        for recorder in (steady, flaky):
            assert recorder.positions() == appended  # nothing skipped, nothing repeated
            assert recorder.calls[0][0] == appended[0] - 1  # from where the tail started: the head
            handed = [(after, events) for after, events in recorder.calls if events]
            for (after, events), (_, previous) in zip(handed[1:], handed, strict=False):
                assert after == previous[-1] and events[0] == after + 1
    finally:
        await tail.close()


async def test_a_late_subscriber_is_told_its_join_point_and_then_handed_only_new_events(
    pool: asyncpg.Pool, store: EventStore, listener: Listener
) -> None:
    tail = LogTail(pool, listener, page_size=100, idle_s=0.2, supervisor=Supervisor())
    early, late = Recorder(), Recorder()
    tail.want(tail.subscribe("early", early.receive), True)
    await tail.start()
    try:
        stream = f"tail-{uuid.uuid4()}"
        before = await append(store, stream, 3)
        await eventually(lambda: early.positions()[-1:] == before[-1:])
        joined = tail.want(tail.subscribe("late", late.receive), True)
        assert joined == before[-1]  # what lies below is its own to read
        after = await append(store, stream, 2)
        await eventually(lambda: late.positions()[-1:] == after[-1:])
        assert late.positions() == after
        assert early.positions() == before + after
    finally:
        await tail.close()


async def test_a_subscriber_of_some_types_gets_each_of_them_once_read_alone_or_from_the_whole_log(
    pool: asyncpg.Pool, store: EventStore, listener: Listener
) -> None:
    """Alone, it is served by reads of its types only (up to the head: it learns how far the log was
    examined); beside a follower of the whole log, from that follower's pages, filtered in memory."""
    tail = LogTail(pool, listener, page_size=2, idle_s=0.2, typed_interval_s=0.0, supervisor=Supervisor())
    marks, ends = Recorder(), []

    async def receive(after: int, events: list[RecordedEvent], end: int) -> None:
        assert all(e.type == "Mark" and after < e.position <= end for e in events)
        ends.append(end)
        await marks.receive(after, events, end)

    tail.want(tail.subscribe("marks", receive, frozenset({"Mark"})), True)
    await tail.start()
    stream = f"tail-{uuid.uuid4()}"

    async def write(kinds: str) -> list[int]:
        result = await store.append_to(stream, ANY, [NewEvent("Mark" if k == "M" else "Tick", {}) for k in kinds])
        positions = [p for s in result.streams for p in s.positions]
        return [p for p, k in zip(positions, kinds, strict=True) if k == "M"]

    try:
        alone = await write("TTMTTTMMMT")
        head = await store.head()
        await eventually(lambda: ends[-1:] == [head])
        assert marks.positions() == alone

        everything = Recorder()
        tail.want(tail.subscribe("all", everything.receive), True)
        beside = await write("TMTTM")
        head = await store.head()
        await eventually(lambda: everything.positions()[-1:] == [head] and ends[-1:] == [head])
        assert marks.positions() == alone + beside  # nothing skipped, nothing repeated
        assert everything.positions() == list(range(head - 4, head + 1))
    finally:
        await tail.close()


async def test_events_are_handed_on_as_stored_with_only_the_schema_version_of_their_metadata(
    pool: asyncpg.Pool, store: EventStore, listener: Listener
) -> None:
    """Read alone (of some types) or from the whole log, each event is the stored one but for its
    metadata: just the schema version, 1 when the event was appended without one."""
    tail = LogTail(pool, listener, page_size=100, idle_s=0.2, typed_interval_s=0.0, supervisor=Supervisor())
    handed: dict[str, list[RecordedEvent]] = {"all": [], "typed": []}

    def keep(name: str) -> Receive:
        async def receive(after: int, events: list[RecordedEvent], end: int) -> None:
            handed[name].extend(events)
        return receive

    typed = tail.subscribe("typed", keep("typed"), frozenset({"Upcast"}))
    tail.want(typed, True)
    await tail.start()
    stream = f"tail-{uuid.uuid4()}"
    events = [NewEvent("Upcast", {"n": 1}, {"actor": "k1", "request_id": "r1", "schema_version": 2}),
              NewEvent("Upcast", {"n": 2}, {"actor": "k1"})]
    try:
        await store.append_to(stream, ANY, events[:1])
        await eventually(lambda: len(handed["typed"]) == 1)
        tail.want(tail.subscribe("all", keep("all")), True)
        await store.append_to(stream, ANY, events[1:])
        await eventually(lambda: len(handed["typed"]) == 2 and len(handed["all"]) == 1)
    finally:
        await tail.close()
    stored = await store.read_stream(stream)
    assert [e.metadata for e in stored] == [events[0].metadata, events[1].metadata]  # the store keeps it all
    trimmed = [replace(e, metadata={"schema_version": n}) for e, n in zip(stored, (2, 1), strict=True)]
    assert handed["typed"] == trimmed
    assert handed["all"] == trimmed[1:]
