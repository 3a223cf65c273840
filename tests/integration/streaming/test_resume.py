"""Every matching event exactly once, in order, across random disconnects while writers append."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from backend.store.event_store import EventStore
from tests.conftest import mint_token
from tests.integration.streaming.conftest import MakeClient, append, connect
from tests.sse_client import Message, Stream

pytestmark = pytest.mark.timeout(120)


async def next_unless_finished(sse: Stream, writing: asyncio.Future[Any], finished: Callable[[], bool]
                               ) -> Message | None:
    """The next message, or None if the writers end while it is awaited and everything has arrived: the
    last frame may have come before the writers were done, and then no other frame ever comes."""
    reading = asyncio.ensure_future(sse.next(timeout=20))
    await asyncio.wait({reading, writing}, return_when=asyncio.FIRST_COMPLETED)
    if not reading.done() and finished():
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        return None
    return await reading


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_disconnects_lose_nothing_and_repeat_nothing(
    make_client: MakeClient, store: EventStore, seed: int
) -> None:
    # A tiny window and page: readers fall behind the window and page the store, back and forth.
    client = await make_client(sse_window_events=16, sse_page_size=7, sse_checkpoint_s=0.1)
    token = await mint_token(client.app, "auditor", ["audit:read"])
    rng = random.Random(seed)
    prefix = f"resume{uuid.uuid4().hex[:8]}-"
    start = await store.head()
    matching: list[int] = []
    writers, appends_each = 4, 40

    async def writer(n: int) -> None:
        wrng = random.Random(seed * 100 + n)
        for _ in range(appends_each):
            count = wrng.randint(1, 3)
            if wrng.random() < 0.6:
                matching.extend(await append(store, f"{prefix}{wrng.randint(0, 5)}", *["Hit"] * count))
            else:
                await append(store, f"noise-{uuid.uuid4()}", *["Noise"] * count)
            await asyncio.sleep(0)

    writing = asyncio.gather(*(writer(n) for n in range(writers)))
    received: list[int] = []
    last_id = str(start)
    connections = 0

    def finished() -> bool:
        return writing.done() and len(received) >= len(matching)

    async with asyncio.timeout(90):
        while not finished():
            sse = await connect(client, "/v1/streams/events", token, stream_prefix=prefix, after=start,
                                headers={"Last-Event-ID": last_id})
            assert sse.status == 200
            connections += 1
            take = rng.randint(1, 12)
            while take and not finished():
                message = await next_unless_finished(sse, writing, finished)
                if message is None:
                    break
                last_id = message.last_id or last_id
                if message.kind == "event":
                    received.append(int(message.last_id))
                    take -= 1
            sse.close()  # abrupt: unread frames in flight are dropped, as a network failure would
    await writing
    assert connections > 5
    assert received == sorted(matching)
