"""A Server-Sent Events stream once admitted: the response that streams from ``write_eof``, the loops
that feed one subscriber from the hub (log events, dashboard stats), and a wallet stream's figures.
Nothing here parses a request or answers one with a problem: the endpoints (checks, admission,
refusals) are backend/http/streams.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast
from uuid import UUID

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

from backend.db import describe, is_unavailable
from backend.domain import Wallet
from backend.store.event_codec import fold
from backend.store.events import RecordedEvent, UnreadableEvent, recorded_time
from backend.streaming import frames
from backend.streaming.hub import Hub
from backend.streaming.subscriber import Subscriber
from backend.streaming.window import FRAME, POSITION

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the stream itself


class EventStream(EventSourceResponse):
    """aiohttp-sse's response (its headers, TCP_USER_TIMEOUT, chunked framing), which streams from
    ``write_eof`` and has no ping task.

    aiohttp calls ``write_eof`` once the handler has returned its response. Streaming there, rather
    than inside the handler, lets the handler's frames and every middleware's go for as long as the
    stream lasts, a measurable share of what an idle stream costs (see docs/PERFORMANCE.md). The handler
    still makes every check and admits the stream first, so errors are problem+json answers.

    aiohttp-sse would start a task per response to send its heartbeat comments: a task, coroutines,
    a future and a timer for every stream, each one more object for every full garbage collection to
    walk. The hub's one heartbeat timer writes them instead (``Hub._beat``).
    """

    def __init__(self, hub: Hub, subscriber: Subscriber, retry_ms: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hub = hub
        self.subscriber: Subscriber | None = subscriber
        self.retry_ms = retry_ms

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """aiohttp-sse's prepare without its ping task. aiohttp prepares again before write_eof; if the
        client has left by then, this raises (as aiohttp-sse does) and write_eof never runs, so the
        stream leaves the hub here."""
        try:
            if self.prepared:
                if request.protocol.transport is None:
                    raise asyncio.CancelledError  # the client left: aiohttp-sse's own test and answer
                return self._payload_writer
            self._set_tcp_user_timeout(request)
            writer = await web.StreamResponse.prepare(self, request)
            self.enable_chunked_encoding()  # after the head, as aiohttp-sse does: an HTTP/1.0 client gets none
            return writer
        except BaseException:
            if self.subscriber is not None:
                self.hub.unsubscribe(self.subscriber)
                self.subscriber = None
            raise

    async def write_eof(self, data: bytes = b"") -> None:
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is None or not self.prepared:
            return await super().write_eof(data)
        hub = self.hub
        subscriber.started = True
        chunked = self.headers.get("Transfer-Encoding") == "chunked"
        try:
            await subscriber.send(frames.opening(self.retry_ms, None if subscriber.stats else subscriber.position))
            subscriber.heartbeat = frames.chunk(frames.PING) if chunked else frames.PING
            if subscriber.stats:
                await pump_dashboard(hub, subscriber)
            else:
                await pump_log(hub, subscriber, chunked)
        except ConnectionError:
            pass  # the client left, or its stuck send was aborted: it resumes from its last id
        except UnreadableEvent as exc:  # a wallet stream's figures need the time: ended as it renders
            log.warning("ending a stream: unreadable event", extra={"position": exc.position, "reason": exc.reason})
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.warning("ending a stream: the database is unavailable", extra={"reason": describe(exc)})
        finally:
            hub.unsubscribe(subscriber)
        await super().write_eof(data)  # a clean end: browsers reconnect (not reached when cancelled)


async def pump_log(hub: Hub, subscriber: Subscriber, chunked: bool) -> None:
    """Send matching events until the stream ends; while it sleeps, the tail may send for it: whole
    chunks straight to the socket, when the response is chunked (always, over HTTP/1.1), of the shared
    frames or, for a stream that renders its own (a wallet's), of what its render makes of them."""
    subscriber.pushable = chunked
    render = subscriber.render
    while subscriber.alive:
        if render is None:
            items = await hub.next_items(subscriber)
            data, last = b"".join(item[FRAME] for item in items), items[-1][POSITION] if items else 0
        else:
            events = await hub.next_events(subscriber)
            data, last = render(events), events[-1].position if events else 0
        if data:
            await subscriber.send(data)
            subscriber.sent_position = last
        elif not hub.caught_up(subscriber):
            continue  # examined a page that held nothing for this filter: read on
        elif hub.checkpoint_due(subscriber):
            await subscriber.send(frames.checkpoint(subscriber.position))
            subscriber.sent_position = subscriber.position
        else:
            await subscriber.sleep()  # nothing awaited since the window was read: no wake-up missed


async def pump_dashboard(hub: Hub, subscriber: Subscriber) -> None:
    feed = hub.stats
    position = feed.position
    snapshot = frames.dumps({"position": position, "stats": feed.stats})
    await subscriber.send(frames.frame(position, "snapshot", snapshot))
    subscriber.sent_position = position
    while subscriber.alive:
        if feed.position <= subscriber.sent_position:
            await subscriber.sleep()
            continue
        early = subscriber.sent_at + feed.interval_s - time.monotonic()
        if early > 0:  # coalesce: whatever is newest when the interval is up goes out (last value wins)
            await asyncio.sleep(early)
            continue
        position = feed.position
        delta = frames.dumps({"position": position, "stats": feed.delta_since(subscriber.sent_position)})
        await subscriber.send(frames.frame(position, "stats", delta))
        subscriber.sent_position = position


class WalletFollower:
    """A wallet stream's running state: each event is folded in and sent with the figures after it."""

    __slots__ = ("named", "state", "wallet_id")

    def __init__(self, wallet_id: UUID, state: Wallet | None, named: bool = False) -> None:
        self.wallet_id = wallet_id
        self.state = state
        self.named = named

    def render(self, events: list[RecordedEvent]) -> bytes:
        chunks = []
        for event in events:
            self.state = cast(Wallet, fold([event], self.state, self.wallet_id))
            view = self.state.view(recorded_time(event.position, event.recorded_at))
            figures = {"balance": view.balance, "available": view.available, "locked": view.locked,
                       "reserved": view.reserved, "version": view.version}
            body = {**frames.event_body(event), "wallet": figures}
            chunks.append(frames.frame(event.position, event.type if self.named else None, frames.dumps(body)))
        return b"".join(chunks)
