"""Read-your-writes: wait, for a bounded time, until a projection's checkpoint reaches a position.

Checkpoints only move forward, so any value seen (advanced by a runner in this process, or read
from projection_checkpoints) is a safe lower bound. A local runner wakes waiters as soon as it
commits; when the leader runs in another process, waiters poll the table with a short backoff.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from backend.store.reads import Executor
from projections.checkpoints import LOAD_SQL


async def poll_checkpoint(db: Executor, name: str, position: int, timeout: float, *,
                          poll_min_s: float = 0.005, poll_max_s: float = 0.05) -> int:
    """A projection's checkpoint as db shows it (a read replica's, which no runner here wakes us for),
    polled with a doubling delay until it is >= position or timeout runs out; the last value read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = poll_min_s
    while True:
        seen = int(await db.fetchval(LOAD_SQL, name) or 0)
        remaining = deadline - loop.time()
        if seen >= position or remaining <= 0:
            return seen
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, poll_max_s)


class CheckpointWatcher:
    def __init__(self, pool: asyncpg.Pool, *, poll_min_s: float = 0.005, poll_max_s: float = 0.05) -> None:
        self.pool = pool
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self.known: dict[str, int] = {}
        self._changed = asyncio.Event()

    def advanced(self, name: str, position: int) -> None:
        """A local runner committed up to position."""
        if position > self.known.get(name, -1):
            self.known[name] = position
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def current(self, name: str) -> int:
        position = await self.pool.fetchval(LOAD_SQL, name)
        if position is not None and position > self.known.get(name, -1):
            self.known[name] = position
        return self.known.get(name, 0)

    async def wait_for(self, name: str, position: int, timeout: float) -> int:
        """The checkpoint once it is >= position, or the latest seen when timeout runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = self.poll_min_s
        while True:
            seen = self.known.get(name, 0)
            if seen < position:
                seen = await self.current(name)
            remaining = deadline - loop.time()
            if seen >= position or remaining <= 0:
                return seen
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, remaining)):
                    await changed.wait()
            delay = min(delay * 2, self.poll_max_s)
