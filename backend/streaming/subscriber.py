"""One stream's state, and where its bytes go: the subscriber the hub (backend/streaming/hub.py) holds
for each open stream.

A send that does not complete within the send timeout closes that stream. Rather than a timer around
every write (nearly all complete at once), a stream whose socket refuses bytes arms one timer, due when
the send timeout has passed since data last left the socket; if by then nothing has left it since, the
connection is aborted (a slow reader that still takes bytes is only re-checked).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from backend.store.events import RecordedEvent
from backend.streaming import tcp
from backend.streaming.filters import EventFilter

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where a subscriber's bytes go (an aiohttp StreamResponse)."""

    def write(self, data: bytes) -> Awaitable[None]: ...


class Transport(Protocol):
    def is_closing(self) -> bool: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

    def abort(self) -> None: ...

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...


Render = Callable[[list[RecordedEvent]], bytes]

STALL_BYTES = 64 * 1024
"""Unsent bytes beyond which a transport counts as stalled: where asyncio pauses writers, and where the
tail stops writing to it (aiohttp's own limit)."""


class Subscriber:
    """One stream's state. Slots only: thousands of these sit idle."""

    __slots__ = ("_stall", "_waiter", "closing", "evicted", "expiry", "filter", "heartbeat", "key_id", "position",
                 "pushable", "render", "send_started", "send_timeout_s", "sent_at", "sent_position", "sink", "started",
                 "transport")

    def __init__(self, key_id: str, transport: Transport, position: int, flt: EventFilter | None,
                 render: Render | None = None, send_timeout_s: float = 10.0) -> None:
        self.key_id = key_id
        self.render = render
        """Turns whole events into bytes, in place of their shared frames (wallet streams add figures)."""
        self.sink: Sink | None = None
        """Set when the response starts."""
        self.transport = transport
        self.filter = flt
        """What a log stream receives; None for a dashboard stream (woken by the stats feed instead)."""
        self.pushable = False
        """Set once the response is under way in chunked framing: the tail may write whole chunks to it
        (the shared event frames, or what its render makes of its own stream's events)."""
        self.heartbeat = b""
        """The heartbeat comment as this response frames it (a chunk when chunked), written straight to
        the socket; empty until the response is under way (its head and opening frame sent)."""
        self.position = position
        """Every event up to here has been examined (and sent if it matched)."""
        self.sent_position = position
        """The last id the client has; a checkpoint frame is owed while it is behind position."""
        self.sent_at = time.monotonic()
        self.send_started = 0.0
        self.send_timeout_s = send_timeout_s
        self.started = False
        self.expiry: asyncio.TimerHandle | None = None
        """Ends the stream when its key expires (set by the endpoint; cancelled when the stream ends)."""
        """Streaming: from here on its own loop ends it (and leaves the hub)."""
        self.closing = False
        self.evicted = False
        """Closed by the stall watchdog: its client stopped reading."""
        self._waiter: asyncio.Future[None] | None = None
        self._stall: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return not self.closing and not self.transport.is_closing()

    @property
    def stats(self) -> bool:
        return self.filter is None

    async def send(self, data: bytes) -> None:
        if self.sink is None:
            raise RuntimeError("the stream has not started")
        if self.transport.get_write_buffer_size() or len(data) > STALL_BYTES:
            self.stalled()  # the socket has refused bytes, or this write may have to wait for it to drain
        self.send_started = time.monotonic()
        try:
            await self.sink.write(data)
        finally:
            self.send_started = 0.0
        self.sent_at = time.monotonic()
        if self._stall is not None and self.transport.get_write_buffer_size() <= STALL_BYTES:
            self._stall.cancel()
            self._stall = None

    def parked_at(self, position: int) -> bool:
        """Asleep and caught up with position: the tail may write to it directly."""
        return self.position == position and self.parked()

    def parked(self) -> bool:
        """Asleep, alive, and under way in chunked framing: the tail may write to it directly."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and self.pushable and self.alive

    def push(self, chunk: bytes) -> bool:
        """Write a complete HTTP chunk now, unless the socket has stopped draining (False)."""
        if not self._write(chunk):
            return False
        self.sent_at = time.monotonic()
        return True

    def beat(self) -> None:
        """Write the heartbeat comment now, if the stream is under way and its socket drains. Not a
        frame: it leaves sent_at (when a checkpoint or dashboard frame is due) alone."""
        if self.heartbeat and self.alive:
            self._write(self.heartbeat)

    def _write(self, chunk: bytes) -> bool:
        unsent = self.transport.get_write_buffer_size()
        if unsent:
            self.stalled()  # the socket refused bytes: watch it
            if unsent > STALL_BYTES:
                return False
        self.transport.write(chunk)  # never blocks: the transport buffers what the socket refuses
        return True

    def stalled(self) -> None:
        """The socket refused bytes: a send that does not complete within the send timeout ends the
        stream. The timeout counts from when data last left the socket (the kernel knows, see
        backend.streaming.tcp), so the time the buffers took to fill is not added to it. One timer
        per stalled stream, none for the others."""
        if self._stall is None:
            idle = tcp.idle_s(self.transport) or 0.0
            self._arm(self._stall_limit() - idle)

    def _stall_limit(self) -> float:
        """The idle time that ends the stream: the send timeout less a little slack (1 %, at most
        100 ms), because a timer fires late on a busy event loop and the stream must be closed by the
        time the timeout is over, not some tens of milliseconds after it."""
        return self.send_timeout_s - min(0.1, self.send_timeout_s / 100)

    def _arm(self, delay: float) -> None:
        self._stall = asyncio.get_running_loop().call_later(max(0.0, delay), self._stall_expired)

    def _stall_expired(self) -> None:
        self._stall = None
        if self.transport.is_closing():
            return
        unsent = self.transport.get_write_buffer_size()
        if not (self.send_started or unsent):
            return  # drained; the next refusal arms a new timer
        idle = tcp.idle_s(self.transport)
        if idle is None:  # no word from the kernel: the timer alone decides
            if not (self.send_started or unsent > STALL_BYTES):
                return
        elif idle < (limit := self._stall_limit()):  # still sending, slowly: a reader, not a frozen client
            self._arm(limit - idle)
            return
        log.info("closing a stream whose client stopped reading", extra={"key_id": self.key_id})
        self.evicted = True
        self.transport.abort()
        self.close()

    def sleep(self) -> asyncio.Future[None]:
        """To await until the hub has news for this subscriber (new events, a tick, or its close): a
        bare future rather than a coroutine, one object less per sleeping stream."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        return waiter

    def wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.closing = True
        self.wake()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
