"""The listener wakes waiters on appends and survives the server killing its connection."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from backend.store.event_store import EventStore
from backend.store.events import NO_STREAM, NewEvent
from backend.store.listener import Listener
from tests.support import eventually


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[Listener]:
    listening = Listener(database_url, poll_interval_s=30.0)  # long poll: wake-ups must come from NOTIFY
    await listening.start()
    try:
        yield listening
    finally:
        await listening.close()


async def test_waiters_wake_on_append(listener: Listener, store: EventStore) -> None:
    head = listener.head
    waiter = asyncio.create_task(listener.wait_beyond(head, timeout=10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    result = await store.append_to(f"l-{uuid.uuid4()}", NO_STREAM, [NewEvent("T", {})])
    assert await asyncio.wait_for(waiter, 5) >= result.position


async def test_wait_times_out_without_appends(listener: Listener) -> None:
    assert await listener.wait_beyond(listener.head, timeout=0.1) == listener.head


async def test_reconnects_after_backend_is_terminated_and_waiters_see_what_was_missed(
    listener: Listener, store: EventStore, pool: asyncpg.Pool
) -> None:
    pid = listener.backend_pid()
    assert pid is not None
    head = listener.head
    waiter = asyncio.create_task(listener.wait_beyond(head, timeout=15))
    assert await pool.fetchval("select pg_terminate_backend($1)", pid)
    # appended while the session is gone: its NOTIFY may be lost, the head read on reconnect is not
    lost = await store.append_to(f"l-{uuid.uuid4()}", NO_STREAM, [NewEvent("T", {})])
    assert await asyncio.wait_for(waiter, 15) >= lost.position
    await eventually(lambda: listener.reconnects >= 1 and listener.backend_pid() not in (None, pid),
                     what="the listener to reconnect on a new session")
    # Appends made after the reconnect are seen through NOTIFY again.
    result = await store.append_to(f"l-{uuid.uuid4()}", NO_STREAM, [NewEvent("T", {})])
    assert await listener.wait_beyond(result.position - 1, timeout=5) >= result.position
