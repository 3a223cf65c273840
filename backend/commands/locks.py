"""Per-stream locks: commands on one aggregate decide one at a time in a process (the command bus
holds them while deciding and submitting the append, not while it commits).

Without them, N concurrent commands on one wallet would all load the same version and N-1 would
lose the optimistic append and retry, again and again. With them, conflicts only happen between
processes, and the bounded retry absorbs those.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable


class StreamLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, streams: Iterable[str]) -> AsyncIterator[None]:
        """Hold every stream's lock, taken in sorted order so two multi-stream commands cannot deadlock."""
        taken: list[tuple[str, asyncio.Lock]] = []
        try:
            for stream in sorted(set(streams)):
                lock = self._ref(stream)
                try:
                    await lock.acquire()
                except BaseException:
                    self._unref(stream)
                    raise
                taken.append((stream, lock))
            yield
        finally:
            for stream, lock in reversed(taken):
                lock.release()
                self._unref(stream)

    def _ref(self, stream: str) -> asyncio.Lock:
        lock, refs = self._locks.get(stream) or (asyncio.Lock(), 0)
        self._locks[stream] = (lock, refs + 1)
        return lock

    def _unref(self, stream: str) -> None:
        lock, refs = self._locks[stream]
        if refs == 1:
            del self._locks[stream]
        else:
            self._locks[stream] = (lock, refs - 1)

    def __len__(self) -> int:
        return len(self._locks)
