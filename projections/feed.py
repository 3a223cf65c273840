"""The log's newest events for this process's projection runners, handed over by its one log tail.

Each runner follows the log on its own connection, and once caught up they all want the same new
events: read alone, six runners would make six reads of them (and decode the same payloads six times)
for every append the process hears of. The feed subscribes to the process's one tail of the log
(backend/store/tail.py), which reads them once, after each NOTIFY or poll, for the SSE hub and every
other follower too, with the one backoff and outage policy of its supervised task. The runners take
their events from memory and wait for the feed to move.

The feed is a run of the newest log (backend.store.run.LogRun, every type): a runner at position p
with start <= p <= end finds here everything after p up to end, and has examined the log up to end.
A runner behind start (catching up after a start or a rebuild) or ahead of end (it read the store
itself while the tail lagged) reads the store itself, as does one that finds the feed standing still
while the log moves on (the tail is down, in its backoff): the feed only saves reads, it never decides
what a runner applies.

The feed wants the tail's pages only while one of the process's runners leads (`leading`): with
several workers, the runners of all but one stand by, and their process neither converts nor keeps the
log for them. A feed that starts wanting again joins at the tail's position; its runners read the
store up to there themselves, as after a start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection, Iterator

from backend.store.events import RecordedEvent
from backend.store.run import LogRun
from backend.store.tail import LogTail
from projections.events import Event, from_recorded

SUBSCRIBER = "projections"


class LogFeed:
    def __init__(self, tail: LogTail, *, capacity: int = 10_000) -> None:
        self.run: LogRun[Event] = LogRun(capacity)
        self._tail = tail
        self._subscriber = tail.subscribe(SUBSCRIBER, self._receive)
        self._changed = asyncio.Event()
        self._moved_at = time.monotonic()
        self._leaders = 0
        self.pages = 0

    async def start(self) -> None:
        """Start the process's tail, if nobody has; pages come while a runner leads (`leading`)."""
        await self._tail.start()

    @contextlib.contextmanager
    def leading(self) -> Iterator[None]:
        """Around a runner's lead: the feed wants every page the tail reads while any runner leads."""
        self._leaders += 1
        if self._leaders == 1:
            self.run.reset(self._tail.want(self._subscriber, True))
            self._moved_at = time.monotonic()
        try:
            yield
        finally:
            self._leaders -= 1
            if self._leaders == 0:
                self._tail.want(self._subscriber, False)

    def close(self) -> None:
        self._tail.unsubscribe(self._subscriber)
        self._wake()

    def after(self, position: int, limit: int, types: Collection[str] | None) -> tuple[list[Event], int] | None:
        """Up to limit events of the given types (None: all) after position, and the position up to which
        the log was examined (the last event's when limit was reached); None when position is outside the
        feed: the caller then reads the store itself."""
        run = self.run
        end = run.end
        if not run.start <= position <= end:
            return None
        if types is None:  # slices of the ring: six runners ask after every page, most of them for nothing
            found = run.after(position, limit)
        else:
            found = [event for event in run.after(position, end - position) if event.type in types]
            if len(found) > limit:
                del found[limit:]
        return found, (found[-1].position if found and len(found) == limit else end)

    def still_for(self) -> float:
        """Seconds since the tail last handed the feed a page."""
        return time.monotonic() - self._moved_at

    async def wait_beyond(self, position: int, timeout: float) -> None:
        """Until the feed's end passes position, or timeout runs out."""
        deadline = time.monotonic() + timeout
        while self.run.end <= position and (remaining := deadline - time.monotonic()) > 0:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    async def _receive(self, after: int, events: list[RecordedEvent], end: int) -> None:
        """The tail's page: the contiguous run after `after` (a jump when after is beyond the feed's end:
        runners below it read the store themselves)."""
        if after != self.run.end:
            self.run.reset(after)
        for event in from_recorded(events):
            self.run.put(event.position, event)
        self.pages += 1
        self._moved_at = time.monotonic()
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
