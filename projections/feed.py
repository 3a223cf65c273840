"""The log's newest events, read once per process for all of its projection runners.

Each runner follows the log on its own connection, and once caught up they all wake on the same
notification: read alone, six runners would make six reads of the same new events (and decode the
same payloads six times) for every append the process hears of. The feed makes that one read: the
first runner to ask for what follows the feed's end reads it, through its own connection, while the
others wait for that read rather than make their own, and then each takes its events from memory.

The feed holds a contiguous run of positions (start, end] of the whole log, read to the head in one
snapshot; positions are gap-free and become visible in order, so a runner at position p with
start <= p <= end finds here everything after p up to end, and has examined the log up to end. A
runner behind start (catching up after a start or a rebuild) reads the store itself, as does every
runner whose shared read failed: the feed only saves reads, it never decides what a runner applies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from backend.db import Connection
from projections.events import Event, read_to_head


class LogFeed:
    def __init__(self, *, capacity: int = 10_000, page_size: int = 1000) -> None:
        if capacity < page_size:
            raise ValueError("the feed must hold at least one page")
        self.capacity = capacity
        self.page_size = page_size
        self.start = 0
        """Events after start, up to end, are held."""
        self.end = 0
        self._events: list[Event] = []
        self._reading: asyncio.Future[bool] | None = None
        self.reads = 0

    async def after(self, conn: Connection, position: int, limit: int,
                    types: Collection[str] | None) -> tuple[list[Event], int] | None:
        """Up to limit events of the given types (None: all) after position, and the position up to which
        the log was examined (the last event's when limit was reached); None when position is behind the
        feed or the read failed: the caller then reads the store itself. conn reads, if a read is due."""
        if position < self.start:
            return None
        if position >= self.end:
            if position > self.end:  # ahead of the feed: whatever it holds is of no use to anyone ahead
                self._restart(position)
            if not await self._read_more(conn) or position < self.start:
                return None
        return self._take(position, limit, types)

    def _take(self, position: int, limit: int, types: Collection[str] | None) -> tuple[list[Event], int]:
        found: list[Event] = []
        events = self._events
        for i in range(position - self.start, len(events)):
            event = events[i]
            if types is None or event.type in types:
                found.append(event)
                if len(found) == limit:
                    return found, event.position
        return found, self.end

    async def _read_more(self, conn: Connection) -> bool:
        """Read what follows end, or wait for the read already under way. False: that read failed."""
        if self._reading is not None:
            return await asyncio.shield(self._reading)
        reading = self._reading = asyncio.get_running_loop().create_future()
        succeeded = False
        try:
            events, head = await read_to_head(conn, self.end, self.page_size)
            self._extend(events, events[-1].position if len(events) == self.page_size else head)
            succeeded = True
        finally:
            self._reading = None
            reading.set_result(succeeded)
        return True

    def _extend(self, events: list[Event], end: int) -> None:
        if events and events[0].position != self.end + 1:  # cannot happen with a gap-free log
            self._restart(events[0].position - 1)
        self._events.extend(events)
        self.end = max(self.end, end)
        if len(self._events) > self.capacity:
            drop = len(self._events) - self.capacity // 2
            del self._events[:drop]
            self.start += drop
        self.reads += 1

    def _restart(self, position: int) -> None:
        self._events = []
        self.start = self.end = position
