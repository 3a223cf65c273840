"""Per-process fan-out of the event log to stream subscribers.

The process's one tail of the log (backend/store/tail.py, woken by its one Listener) hands the hub
each new batch of events once; the hub puts it into the shared ``Window`` and wakes the subscribers it
concerns. Subscribers that
follow one stream (a wallet's, or ``?stream=``) are indexed by that stream: a batch reaches only those
of its own streams, and they find their events in the window by the window's per-stream links; so an
event costs work in proportion to the subscribers that want it, not to all of them. The others (the
whole log, a prefix, some types) are examined for every batch, as they may want anything.

A subscriber keeps only its position (and a few numbers): its own task takes what follows that
position from the window, or, when it has fallen behind the window, pages through the store; there
is no per-subscriber queue, so an idle subscriber costs the same small amount however busy the log
is, and a slow one just lags.

The tail also serves the common case itself: a subscriber parked at the old end of the window (caught
up, its task asleep, its socket draining) gets the new events written straight to its transport as one
complete HTTP chunk, without waking its task; unfiltered subscribers share the very same bytes. At a
thousand subscribers that is one system call each per batch and little else. Everyone else (behind,
busy, or with a socket that has stopped draining) is woken and serves itself, with back-pressure.

Each stream is a ``Subscriber`` (backend/streaming/subscriber.py: its position, its socket, and the
stall watchdog that closes a stream whose client stopped reading); the hub holds them. A ticker visits
every stream every checkpoint interval, so that idle streams notice a vanished client and filtered
ones send the checkpoints they owe (a parked stream's own checkpoint is written there and then, like
the tail's pushes; only the others are woken); another writes every stream's heartbeat comment,
straight to its socket.
Both are one task for the process: what an idle stream costs is its objects, and every one of those
is one more for each full garbage collection to walk (a pause for every stream at once), so a stream
keeps no task, timer or queue of its own beyond its request's.
The tail, the tickers and the dashboard feed run under the process's
Supervisor: a failed read (or a failed batch here) ends the run, and the supervisor starts it again
with backoff; the tail then hands the hub the events it has not taken yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, cast

from backend.config import Settings
from backend.store import reads
from backend.store.events import RecordedEvent, UnreadableEvent
from backend.store.listener import Listener
from backend.store.read_pools import ReadPools
from backend.store.reads import Executor
from backend.store.tail import LogTail
from backend.streaming import frames
from backend.streaming.dashboard import StatsFeed, StatsSource
from backend.streaming.filters import EventFilter
from backend.streaming.owners import Owners
from backend.streaming.subscriber import STALL_BYTES, Render, Subscriber, Transport
from backend.streaming.window import FRAME, POSITION, STREAM, Item, Window, make_item
from backend.supervisor import Supervised, Supervisor

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HubConfig:
    window_events: int = 10_000
    page_size: int = 500
    checkpoint_s: float = 5.0
    heartbeat_s: float = 15.0
    send_timeout_s: float = 10.0
    max_streams: int = 10_000
    max_streams_per_key: int = 32
    shutdown_window_s: float = 2.0
    dashboard_interval_s: float = 0.25

    @classmethod
    def from_settings(cls, settings: Settings) -> HubConfig:
        return cls(
            window_events=settings.sse_window_events,
            page_size=settings.sse_page_size,
            checkpoint_s=settings.sse_checkpoint_s,
            heartbeat_s=settings.sse_heartbeat_s,
            send_timeout_s=settings.sse_send_timeout_s,
            max_streams=settings.sse_max_streams,
            max_streams_per_key=settings.sse_max_streams_per_key,
            shutdown_window_s=settings.sse_shutdown_window_s,
            dashboard_interval_s=settings.sse_dashboard_interval_s,
        )


class StreamRefused(Exception):
    """No room for another stream: for this key, in this process, or the process is shutting down."""

    def __init__(self, reason: Literal["key", "process", "closing"]) -> None:
        super().__init__(reason)
        self.reason = reason


class HostStreams(Protocol):
    """The open streams of every worker of this host, by key (backend/shared_limits.py):
    `open_stream` counts one more unless the host has `cap` (None: the key found no room, then this
    process's own count is all that limits it)."""

    def open_stream(self, key: str, cap: int) -> bool | None: ...

    def close_stream(self, key: str) -> None: ...


RECENT_EVENTS = 1024
"""Whole events kept for wallet streams: the latest few batches, which is what a follower woken for its
new events needs; kept apart from the window, whose items are atomic on purpose, and few enough that the
cyclic collector hardly notices them."""

TICK_SLICE = 256
"""The ticker visits this many subscribers at a time, then lets those it woke run."""

BEAT_SLICE = 1024
"""Heartbeats written between two turns of the event loop (a write each, nobody woken)."""


class Hub:
    def __init__(self, db: Executor | ReadPools, listener: Listener, config: HubConfig, stats_source: StatsSource,
                 supervisor: Supervisor | None = None, tail: LogTail | None = None,
                 host_streams: HostStreams | None = None) -> None:
        self._pools = ReadPools.of(db)
        """Catch-up pages come from a replica that has replayed the window's end, else the primary."""
        db = self.db = self._pools.primary
        self.host_streams = host_streams
        """With several workers on the host: the per-key stream cap counts them all."""
        self._host_counted: set[Subscriber] = set()
        """The subscribers host_streams counted (one that found no room there was not)."""
        self.listener = listener
        self.config = config
        self.window = Window(config.window_events)
        self._recent: list[RecordedEvent | None] = [None] * RECENT_EVENTS
        """The latest whole events the tail read, by position modulo the size: a wallet stream woken for
        its new events folds them from here rather than read them back from the store."""
        self.owners = Owners(db)
        self._log_subscribers: set[Subscriber] = set()
        self._scanned: set[Subscriber] = set()
        """Log subscribers that may want any stream's events: examined for every batch."""
        self._by_stream: dict[str, Subscriber | set[Subscriber]] = {}
        """Log subscribers that follow one stream, by its id: reached only by that stream's events. A
        stream most often has one follower (a dashboard per wallet), held as itself: no set each."""
        self._stats_subscribers: set[Subscriber] = set()
        self._per_key: dict[str, int] = {}
        self.evictions = 0
        """Streams the stall watchdog closed because their client stopped reading (a connection the
        kernel aborts first, after TCP_USER_TIMEOUT, ends as a client that left and is not counted)."""
        self._drained = asyncio.Event()
        self._closing = False
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._jobs: list[Supervised] = []
        self._own_tail = tail is None
        """Without the process's tail (tests, tools), the hub makes and closes its own."""
        self._log_tail = tail if tail is not None else LogTail(
            db, listener, page_size=config.page_size, idle_s=config.checkpoint_s, supervisor=self._supervisor)
        self._tail = self._log_tail.subscribe("sse-hub", self._receive)
        self.stats = StatsFeed(stats_source, self._log_tail, config.dashboard_interval_s,
                               lambda: self._wake(self._stats_subscribers))

    @property
    def streams(self) -> int:
        return len(self._log_subscribers) + len(self._stats_subscribers)

    @property
    def log_streams(self) -> int:
        return len(self._log_subscribers)

    @property
    def followed_streams(self) -> int:
        """Distinct streams followed by one-stream subscribers (the index's keys)."""
        return len(self._by_stream)

    def interested(self, stream_id: str) -> set[Subscriber]:
        """The log subscribers an event of this stream is examined for: its followers and the scanned."""
        return self._scanned | set(self._followers(stream_id))

    def _followers(self, stream_id: str) -> Iterable[Subscriber]:
        found = self._by_stream.get(stream_id)
        return () if found is None else (found,) if isinstance(found, Subscriber) else found

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.window.reset(await reads.head(self.db))
        await self._log_tail.start()
        spawn = self._supervisor.spawn
        self._jobs = [spawn("sse-ticker", self._tick), spawn("sse-heartbeat", self._beat),
                      spawn("dashboard-stats", self.stats.run)]

    async def shutdown(self) -> None:
        """Refuse new streams and end every open one, the closes spread evenly over the shutdown window
        in random order, so that browsers do not all reconnect (elsewhere) at the same instant."""
        self._closing = True
        subscribers = [*self._log_subscribers, *self._stats_subscribers]
        if not subscribers:
            return
        random.shuffle(subscribers)
        loop = asyncio.get_running_loop()
        spread = self.config.shutdown_window_s / len(subscribers)
        for i, subscriber in enumerate(subscribers):
            loop.call_later(0 if not subscriber.alive else i * spread, subscriber.close)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.shutdown_window_s + self.config.send_timeout_s):
                await self._drained.wait()

    async def close(self) -> None:
        """End the streams, then the background jobs; never raises what those jobs went through."""
        await self.shutdown()
        jobs, self._jobs = self._jobs, []
        self._log_tail.unsubscribe(self._tail)
        self.stats.close()
        if self._own_tail:
            await self._log_tail.close()
        for job in jobs:
            await self._supervisor.stop(job)

    # ---------------------------------------------------------------- subscribers

    def subscribe(self, key_id: str, transport: Transport, position: int, flt: EventFilter | None,
                  render: Render | None = None) -> Subscriber:
        """Admit a stream (flt None: a dashboard), or raise StreamRefused (before the response starts)."""
        self.admit(key_id)
        host = self.host_streams
        counted = host.open_stream(key_id, self.config.max_streams_per_key) if host is not None else None
        if counted is False:
            raise StreamRefused("key")
        subscriber = Subscriber(key_id, transport, position, flt, render, self.config.send_timeout_s)
        if counted:
            self._host_counted.add(subscriber)
        self._per_key[key_id] = self._per_key.get(key_id, 0) + 1
        if flt is None:
            self._stats_subscribers.add(subscriber)
            self.stats.active.set()
        else:
            self._log_subscribers.add(subscriber)
            if flt.stream is None:
                self._scanned.add(subscriber)
            else:
                found = self._by_stream.get(flt.stream)
                if found is None:
                    self._by_stream[flt.stream] = subscriber
                elif isinstance(found, Subscriber):
                    self._by_stream[flt.stream] = {found, subscriber}
                else:
                    found.add(subscriber)
            if not self._tail.wanting and (joined := self._log_tail.want(self._tail, True)) > self.window.end:
                self.window.reset(joined)  # the tail hands what follows joined; nobody needed the rest
        return subscriber

    def end_streams_of(self, key_id: str) -> None:
        """End every stream of a key that was revoked, cleanly: a browser reconnects and is refused (401)."""
        if key_id not in self._per_key:
            return
        for subscriber in [*self._log_subscribers, *self._stats_subscribers]:
            if subscriber.key_id == key_id:
                subscriber.close()

    def admit(self, key_id: str) -> None:
        if self._closing:
            raise StreamRefused("closing")
        if self.streams >= self.config.max_streams:
            raise StreamRefused("process")
        if self._per_key.get(key_id, 0) >= self.config.max_streams_per_key:
            raise StreamRefused("key")

    def unsubscribe(self, subscriber: Subscriber) -> None:
        group = self._stats_subscribers if subscriber.stats else self._log_subscribers
        if subscriber not in group:
            return
        group.discard(subscriber)
        if subscriber.expiry is not None:
            subscriber.expiry.cancel()
        subscriber.heartbeat = b""  # its response ends next: nothing more goes to the socket from here
        self.evictions += subscriber.evicted
        stream = subscriber.filter.stream if subscriber.filter is not None else None
        if stream is None:
            self._scanned.discard(subscriber)
        elif (followers := self._by_stream.get(stream)) is subscriber:
            del self._by_stream[stream]
        elif isinstance(followers, set):
            followers.discard(subscriber)
            if len(followers) == 1:
                self._by_stream[stream] = followers.pop()
        if self.host_streams is not None and subscriber in self._host_counted:
            self._host_counted.discard(subscriber)
            self.host_streams.close_stream(subscriber.key_id)
        left = self._per_key[subscriber.key_id] - 1
        if left:
            self._per_key[subscriber.key_id] = left
        else:
            del self._per_key[subscriber.key_id]
        if not self._stats_subscribers:
            self.stats.active.clear()
        if not self._log_subscribers:
            self._log_tail.want(self._tail, False)
        if self._closing and not self.streams:
            self._drained.set()

    async def next_items(self, subscriber: Subscriber) -> list[Item]:
        """The matching events that follow the subscriber's position, advancing it past every event
        examined: a slice of the window when the window covers the position, else one page of the store.
        An empty answer with ``caught_up`` false means "examined some, none matched": ask again."""
        flt = self._filter(subscriber)
        if self.window.covers(subscriber.position):
            if flt.stream is not None:
                items = self._stream_items(subscriber, flt.stream)
                return [item for item in items if flt.matches(item)]
            items = self.window.after(subscriber.position, self.config.page_size)
            if items:
                subscriber.position = items[-1][POSITION]
            return items if flt.everything else [item for item in items if flt.matches(item)]
        get = self.owners.get
        return [make_item(event, get(event.stream_id)) for event in await self._page(subscriber, flt)]

    async def next_events(self, subscriber: Subscriber) -> list[RecordedEvent]:
        """Like next_items, for streams that need whole events (a wallet's, folded for its figures): the
        window, which keeps only frames, just tells whether anything is new for them; the store has it."""
        flt = self._filter(subscriber)
        if self.window.covers(subscriber.position):
            if flt.stream is not None:
                position = subscriber.position
                matching = [item for item in self._stream_items(subscriber, flt.stream) if flt.matches(item)]
                recent = [self._recent_event(item[POSITION]) for item in matching]
                if all(recent):
                    return cast(list[RecordedEvent], recent)
                subscriber.position = position  # the store has the whole events after it
                return await self._page(subscriber, flt)
            items = self.window.after(subscriber.position, self.config.page_size)
            if not any(flt.matches(item) for item in items):
                if items:
                    subscriber.position = items[-1][POSITION]
                return []
        return await self._page(subscriber, flt)

    def _recent_event(self, position: int) -> RecordedEvent | None:
        event = self._recent[position % RECENT_EVENTS]
        return event if event is not None and event.position == position else None

    def _stream_items(self, subscriber: Subscriber, stream: str) -> list[Item]:
        """The stream's items after the subscriber's position (which the window covers), up to a page,
        advancing the position past them, or to the window's end when that was all of them."""
        limit = self.config.page_size
        items = self.window.after_in(stream, subscriber.position, limit)
        if len(items) == limit:
            subscriber.position = items[-1][POSITION]
        else:  # that was all of them up to the window's end (a position beyond it has nothing to read yet)
            subscriber.position = max(subscriber.position, self.window.end)
        return items

    @staticmethod
    def _filter(subscriber: Subscriber) -> EventFilter:
        if subscriber.filter is None:
            raise TypeError("dashboard streams do not read the log")
        return subscriber.filter

    async def _page(self, subscriber: Subscriber, flt: EventFilter) -> list[RecordedEvent]:
        """One page of matching events from the store, after the subscriber's position."""
        bound = self.window.end  # read by the tail, hence visible: the query sees everything up to it
        sql, args = flt.query(subscriber.position, self.config.page_size)
        # on a replica only if it has replayed bound (checked on the connection that reads the page)
        rows = await self._pools.read(lambda db: db.fetch(sql, *args), at_least=bound)
        events = [reads.to_event(row) for row in rows]
        if len(events) == self.config.page_size:
            subscriber.position = events[-1].position
        else:  # the query returned every match it could see, and it saw at least up to bound
            subscriber.position = max(subscriber.position, bound, events[-1].position if events else 0)
        await self.owners.resolve(events)
        get = self.owners.get
        return [e for e in events if flt.accepts(e.stream_id, e.type, get(e.stream_id))]

    def caught_up(self, subscriber: Subscriber) -> bool:
        return subscriber.position >= self.window.end

    def checkpoint_due(self, subscriber: Subscriber) -> bool:
        return (subscriber.sent_position < subscriber.position
                and time.monotonic() - subscriber.sent_at >= self.config.checkpoint_s)

    async def items(self, events: list[RecordedEvent]) -> list[Item]:
        await self.owners.resolve(events)
        get = self.owners.get
        return [make_item(event, get(event.stream_id)) for event in events]

    # ---------------------------------------------------------------- background tasks

    @staticmethod
    def _wake(subscribers: Iterable[Subscriber]) -> None:
        for subscriber in subscribers:
            subscriber.wake()

    async def _receive(self, after: int, events: list[RecordedEvent], end: int) -> None:
        """The log tail's next batch: the events after position `after`, into the window, then published.
        A batch that does not follow the window's end (the hub had no streams for a while) restarts the
        window there: streams behind it read the store."""
        if self.window.end != after:
            self.window.reset(after)
            if not events:
                self._wake(self._log_subscribers)  # behind the window now: they read the store
        if not events:
            return
        items = await self.items(events)
        recent = self._recent
        for event in events[-RECENT_EVENTS:]:
            recent[event.position % RECENT_EVENTS] = event
        self.window.extend(items)
        self._publish(items, after)

    def _publish(self, items: list[Item], end: int) -> None:
        """New items follow position end: push them to the subscribers parked there, wake the others."""
        new_end = self.window.end
        if items[0][POSITION] != end + 1 or new_end != items[-1][POSITION]:
            self._wake(self._log_subscribers)  # the window was reset: everyone reads for themselves
            return
        shared: bytes | None = None
        for subscriber in self._scanned:
            flt = subscriber.filter
            if flt is None or subscriber.render is not None or not subscriber.parked_at(end):
                subscriber.wake()
                continue
            if flt.everything:
                if shared is None:
                    shared = frames.chunk(b"".join(item[FRAME] for item in items))
                if subscriber.push(shared):
                    subscriber.position = subscriber.sent_position = new_end
                else:
                    subscriber.wake()  # it lags from here on, and reads for itself when the socket drains
                continue
            self._push_matching(subscriber, flt, [item for item in items if flt.matches(item)], new_end)
        if not self._by_stream:
            return
        for stream in dict.fromkeys(item[STREAM] for item in items):
            for subscriber in self._followers(stream):
                self._publish_to_follower(subscriber, stream, end, new_end)

    def _publish_to_follower(self, subscriber: Subscriber, stream: str, end: int, new_end: int) -> None:
        """A one-stream subscriber whose stream has new events after end. Its position may lag (batches
        without its stream's events leave it alone): if nothing of its stream lies between its position
        and end, it is as good as parked at end, and the tail may push to it."""
        flt = subscriber.filter
        if flt is None or not subscriber.parked() or not self.window.covers(subscriber.position):
            subscriber.wake()
            return
        items = self.window.after_in(stream, subscriber.position, self.config.page_size)
        if not items or items[0][POSITION] <= end or len(items) == self.config.page_size:
            subscriber.wake()
            return
        matching = [item for item in items if flt.matches(item)]
        if subscriber.render is None:
            self._push_matching(subscriber, flt, matching, new_end)
            return
        events = [self._recent_event(item[POSITION]) for item in matching]
        if not all(events):
            subscriber.wake()  # not all at hand: it reads them from the store itself
            return
        self._push_rendered(subscriber, subscriber.render, cast(list[RecordedEvent], events), new_end)

    def _push_rendered(self, subscriber: Subscriber, render: Render, events: list[RecordedEvent], new_end: int) -> None:
        """A parked wallet stream's new events, rendered (folded into its figures) and pushed here rather
        than by waking its task: the same bytes its own loop would send, without the task switch. Once
        rendered, the events are folded in and must go out: a socket that stopped draining is seen first."""
        if subscriber.transport.get_write_buffer_size() > STALL_BYTES:
            subscriber.stalled()
            subscriber.wake()
            return
        try:
            data = render(events)
        except UnreadableEvent as exc:
            log.warning("ending a stream: unreadable event", extra={"position": exc.position, "reason": exc.reason})
            subscriber.close()
            return
        except Exception:  # its state may be half folded: end the stream (the client resumes afresh)
            log.exception("ending a stream whose events could not be rendered", extra={"key_id": subscriber.key_id})
            subscriber.close()
            return
        self._push_frames(subscriber, data, events[-1].position if events else 0, new_end)

    def _push_matching(self, subscriber: Subscriber, flt: EventFilter, matching: list[Item], new_end: int) -> None:
        """Push a parked filtered subscriber's share of a batch (and a checkpoint, when one is owed)."""
        data = b"".join(item[FRAME] for item in matching)
        self._push_frames(subscriber, data, matching[-1][POSITION] if matching else 0, new_end)

    def _push_frames(self, subscriber: Subscriber, data: bytes, last: int, new_end: int) -> None:
        """Push frames up to position last (none when data is empty), then advance the subscriber to
        new_end, with a checkpoint when one is owed. A socket that stopped draining: woken instead."""
        if data and not subscriber.push(frames.chunk(data)):
            subscriber.wake()
            return
        subscriber.position = new_end
        if data:
            subscriber.sent_position = last
        if self.checkpoint_due(subscriber) and subscriber.push(frames.chunk(frames.checkpoint(new_end))):
            subscriber.sent_position = new_end

    async def _tick(self) -> None:
        """Every checkpoint interval, every stream: idle ones notice a vanished client, and filtered
        ones send the checkpoint they owe. Streams admitted whose client left before they started
        streaming have no loop to end them: they leave here."""
        while True:
            await asyncio.sleep(self.config.checkpoint_s)
            for group in (self._log_subscribers, self._stats_subscribers):
                for subscriber in [s for s in group if not s.started and s.transport.is_closing()]:
                    self.unsubscribe(subscriber)
                due = list(group)
                for first in range(0, len(due), TICK_SLICE):
                    self._tick_slice(due[first:first + TICK_SLICE])
                    await asyncio.sleep(0)  # the woken run before the next slice: no burst holds up the tail

    def _tick_slice(self, subscribers: Iterable[Subscriber]) -> None:
        for subscriber in subscribers:
            if not self._ticked_here(subscriber):
                subscriber.wake()

    def _ticked_here(self, subscriber: Subscriber) -> bool:
        """Do a parked log stream's tick here, as its own loop would (move it to the window's end when
        nothing of its own lies before that; write the checkpoint it owes), without waking it: at ten
        thousand followers, a wake-up each every tick cost more than their events. False: wake it (it
        has something to read, its client left, or its socket stopped draining)."""
        flt = subscriber.filter
        if flt is None or not subscriber.parked() or not self.window.covers(subscriber.position):
            return False
        end = self.window.end
        if flt.stream is not None:
            if self.window.after_in(flt.stream, subscriber.position, 1):
                return False
            subscriber.position = max(subscriber.position, end)
        elif subscriber.position != end:
            return False
        if self.checkpoint_due(subscriber):
            if not subscriber.push(frames.chunk(frames.checkpoint(subscriber.position))):
                return False
            subscriber.sent_position = subscriber.position
        return True

    async def _beat(self) -> None:
        """Every heartbeat interval, a comment on every stream under way, so that proxies keep idle
        streams open: one timer for the process rather than a task (and its timer) per stream, and the
        comments go straight to the sockets, between whole frames, without waking anyone. A socket that
        refuses them is watched like any other stalled send."""
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            streams = [*self._log_subscribers, *self._stats_subscribers]
            for first in range(0, len(streams), BEAT_SLICE):
                for subscriber in streams[first:first + BEAT_SLICE]:
                    subscriber.beat()
                await asyncio.sleep(0)
