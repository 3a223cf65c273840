"""One tail of the log per process: one reader after each NOTIFY (or poll), for every in-process follower.

Without it each follower (the SSE hub, the revocation watcher, and in time the projection runners and
the dashboard feed) re-read the same new events after every notification, each with its own loop and
error handling. Here one supervised task waits on the process's Listener, reads what follows its
position once, in pages (`LogTail.read`, or `LogTail.read_types`), and hands each page to the
subscribers that want it, in order.

With read replicas (backend/store/read_pools.py) the tail still learns the head from the primary (its
Listener: LISTEN does not work on a hot standby), and reads the rows from a replica in use. A replica
shows a prefix of the log, so its page is either complete or ends where its replay has got to; the
rest, up to the head the Listener announced, is read from the primary in the same call. Subscribers
get one contiguous run either way: nothing skipped, nothing repeated, whichever server served it and
whether or not a replica restarted meanwhile.

The events a subscriber is handed are whole but for their metadata, which holds only the schema
version (`reads.read_followed`): no follower needs more, and the rest made every row heavier.

A subscriber may want only some event types (the revocation watcher: `ApiKeyRevoked`). While someone
follows the whole log, it gets its types filtered in memory from the page read anyway; while only such
subscribers want pages, the tail reads just their types and the head in one query (at most once per
`typed_interval_s`), and tells them how far the log was examined (`end`).

Each subscriber keeps the position up to which it was handed events. A page goes to a subscriber as
the events after its position, with the position they follow: so after a failed run (a subscriber's
handler raised, or a read did) the supervisor restarts the task with backoff, the page is read again
and every subscriber gets exactly what it has not had yet: nothing skipped, nothing repeated. A
subscriber that did not want pages for a while (`want(False)`), or joined late, is first handed an
empty page at the tail's position (at the latest after the next event or `idle_s`): it must read the
gap below it from the store itself (or decide nobody needs it), as a follower that falls behind always
has. When nobody wants pages the task sleeps, and on waking it jumps to the head: what happened
meanwhile was wanted by nobody.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from backend.store import reads
from backend.store.events import RecordedEvent
from backend.store.listener import Listener
from backend.store.read_pools import ReadPools
from backend.store.reads import Executor
from backend.supervisor import Supervised, Supervisor

TASK = "sse-tail"
"""The supervised task's name: kept from when only the SSE hub tailed the log (health and metrics
report it under this name)."""

Receive = Callable[[int, list[RecordedEvent], int], Awaitable[None]]
"""Called with (after, events, end): the subscriber's events (of its types) among positions (after, end],
in order; for a subscriber of every type, the contiguous run after `after` (end is the last one's). An
`after` beyond what the subscriber was handed so far means it was not handed what lies between (empty
events: the tail just jumped to the head)."""


class TailSubscriber:
    __slots__ = ("name", "position", "receive", "types", "wanting")

    def __init__(self, name: str, receive: Receive, types: frozenset[str] | None) -> None:
        self.name = name
        self.receive = receive
        self.types = types
        """None: every event; else only these types (the tail may then read only them)."""
        self.position = -1
        """Handed every event (of its types) up to here (-1: nothing yet)."""
        self.wanting = False


class LogTail:
    def __init__(self, db: Executor | ReadPools, listener: Listener, *, page_size: int = 500, idle_s: float = 5.0,
                 typed_interval_s: float = 0.2, supervisor: Supervisor | None = None) -> None:
        self._pools = ReadPools.of(db)
        self._db = self._pools.primary
        self._listener = listener
        self.page_size = page_size
        self.idle_s = idle_s
        self.typed_interval_s = typed_interval_s
        """Floor between two reads of only some types (nobody follows the whole log): under write load
        the Listener wakes on every append, and such followers (revocations) need no lower latency."""
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._subscribers: list[TailSubscriber] = []
        self._wanted = asyncio.Event()
        self._job: Supervised | None = None
        self.position = 0
        """The log has been read, and handed to every wanting subscriber, up to here."""
        self._placed = False
        """Started: position was set to the head."""
        self.reads = 0
        self._typed_at = 0.0

    def subscribe(self, name: str, receive: Receive, types: frozenset[str] | None = None) -> TailSubscriber:
        """A new subscriber (of the given event types; None: all); it gets pages once it wants them (`want`)."""
        subscriber = TailSubscriber(name, receive, types)
        self._subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: TailSubscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)
        self._update()

    def want(self, subscriber: TailSubscriber, wanting: bool) -> int:
        """Start or stop handing the subscriber pages. Returns the position after which it will be handed
        events: one that starts wanting must take what lies below from elsewhere (the store)."""
        if subscriber.wanting != wanting:
            subscriber.wanting = wanting
            if wanting and subscriber.position < self.position:
                subscriber.position = self.position
            self._update()
        return subscriber.position

    def _update(self) -> None:
        if any(s.wanting for s in self._subscribers):
            self._wanted.set()
        else:
            self._wanted.clear()

    async def start(self) -> None:
        """Place the tail at the head and start its task (once; a second call does nothing)."""
        if self._job is None and not self._placed:
            self._placed = True
            self.position = await self.head()
            self._job = self._supervisor.spawn(TASK, self._run)

    async def close(self) -> None:
        job, self._job = self._job, None
        await self._supervisor.stop(job)

    async def read(self, after: int, limit: int) -> list[RecordedEvent]:
        """The tail's read of the log: up to limit events after a position (from a replica in use as far
        as it has replayed them, the rest from the primary)."""
        self.reads += 1
        head = self._listener.head
        served = await self._pools.on_replica(lambda db: reads.read_followed(db, after, limit))
        if served is None:
            return await reads.read_followed(self._db, after, limit)
        events = served[0]
        last = events[-1].position if events else after
        if len(events) < limit and last < head:  # the replica has replayed up to `last`: the rest is the primary's
            events += await reads.read_followed(self._db, last, limit - len(events))
        return events

    async def read_types(self, after: int, limit: int, types: frozenset[str]) -> tuple[list[RecordedEvent], int]:
        """Its read while only some types are wanted: up to limit of them after a position, and the head
        (examined up to there when the page is not full); like `read`, from a replica as far as it has
        replayed the log."""
        self.reads += 1
        wanted = sorted(types)
        head = self._listener.head
        served = await self._pools.on_replica(lambda db: reads.read_types_to_head(db, after, limit, wanted))
        if served is None:
            return await reads.read_types_to_head(self._db, after, limit, wanted)
        events, replayed = served[0]
        if len(events) < limit and replayed < head:
            rest, head = await reads.read_types_to_head(self._db, max(after, replayed), limit - len(events), wanted)
            return events + rest, head
        return events, replayed

    async def head(self) -> int:
        return await reads.head(self._db)

    async def _run(self) -> None:
        while True:
            if not self._wanted.is_set():
                await self._wanted.wait()
                self.position = await self.head()  # nobody wanted what happened meanwhile
                continue
            position = self.position
            for subscriber in self._subscribers:
                if subscriber.wanting and subscriber.position < position:  # joined late, or wants again
                    await self._hand(subscriber, position, [], position)
            if self._listener.head <= position:
                await self._listener.wait_beyond(position, self.idle_s)
                if self._listener.head <= position:
                    continue
            wanting = [s for s in self._subscribers if s.wanting]
            types = self._types(wanting)
            if types is not None:
                await asyncio.sleep(max(0.0, self._typed_at + self.typed_interval_s - time.monotonic()))
                self._typed_at = time.monotonic()
            if types is None:
                events = await self.read(position, self.page_size)
                if not events:
                    continue
                end = events[-1].position
            else:
                events, head = await self.read_types(position, self.page_size, types)
                end = events[-1].position if len(events) == self.page_size else max(head, position)
            for subscriber in wanting:
                await self._hand(subscriber, position, events, end)
            self.position = end

    @staticmethod
    def _types(wanting: list[TailSubscriber]) -> frozenset[str] | None:
        """What to read: every event if anyone wants them all, else only the types wanted (cheap to read
        when rare, like revocations, while nobody follows the whole log)."""
        union: set[str] = set()
        for subscriber in wanting:
            if subscriber.types is None:
                return None
            union |= subscriber.types
        return frozenset(union)

    @staticmethod
    async def _hand(subscriber: TailSubscriber, after: int, events: list[RecordedEvent], end: int) -> None:
        """The events the subscriber has not had yet (all of them when it lags: it sees after > its position)."""
        if subscriber.position >= end:
            return  # had them before a failed run
        types = subscriber.types
        if subscriber.position > after:
            events = (events[subscriber.position - after:] if types is None  # a contiguous run
                      else [e for e in events if e.position > subscriber.position])
            after = subscriber.position
        if types is not None:
            events = [e for e in events if e.type in types]
        await subscriber.receive(after, events, end)
        subscriber.position = end
