"""The hub's subscriber index: an event is examined only for the subscribers that may want it (those
that follow its stream, and those that may want any stream), and each gets exactly its own events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from backend.store.events import RecordedEvent
from backend.streaming import frames
from backend.streaming.dashboard import StatsSource
from backend.streaming.filters import EVERYTHING, EventFilter
from backend.streaming.hub import Hub, HubConfig
from backend.streaming.subscriber import Render
from backend.streaming.window import POSITION, Item, Window, make_item
from tests.conftest import mint_token
from tests.integration.streaming.conftest import MakeClient, connect, hub_of
from tests.integration.streaming.test_wallets_dashboard import open_wallet, post
from tests.sse_client import Message
from tests.support import eventually

pytestmark = pytest.mark.timeout(120)


def item(position: int, stream: str, type_: str = "T") -> Item:
    event = RecordedEvent(position, stream, 1, type_, {}, {}, uuid.uuid4(), datetime.now(UTC), b"")
    return make_item(event, None)


class Transport:
    """A socket that takes every byte (what the hub writes is kept for the test to read)."""

    def __init__(self) -> None:
        self.written = b""

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def abort(self) -> None:
        raise AssertionError("nothing here stalls")

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return 0


async def no_stats() -> dict[str, Any]:
    return {}


def bare_hub(**config: Any) -> Hub:
    """A hub whose log and listener are never read: only its bookkeeping and publishing run."""
    return Hub(cast(Any, None), cast(Any, None), HubConfig(**config), cast(StatsSource, no_stats))


def test_window_finds_a_streams_events_by_its_links() -> None:
    window = Window(8)
    window.reset(10)
    window.extend(item(p, "a" if p % 3 == 0 else "b") for p in range(11, 23))  # holds 15..22
    assert (window.start, window.end) == (14, 22)
    assert [i[POSITION] for i in window.after_in("a", 14, 10)] == [15, 18, 21]
    assert [i[POSITION] for i in window.after_in("a", 15, 10)] == [18, 21]
    assert [i[POSITION] for i in window.after_in("a", 15, 1)] == [18]
    assert [i[POSITION] for i in window.after_in("b", 19, 10)] == [20, 22]
    assert window.after_in("a", 21, 10) == [] and window.after_in("c", 14, 10) == []
    assert window.latest_of("a") == 21 and window.latest_of("c") == 0
    with pytest.raises(ValueError, match="behind"):
        window.after_in("a", 13, 1)
    window.extend(item(p, "b") for p in range(23, 31))  # "a" has nothing held any more: forgotten
    assert window.latest_of("a") == 0 and window.after_in("a", 22, 10) == []
    assert [i[POSITION] for i in window.after_in("b", 27, 10)] == [28, 29, 30]


async def test_index_follows_subscribe_unsubscribe_and_resubscribe() -> None:
    hub = bare_hub()
    t = Transport()
    a1 = hub.subscribe("k", t, 0, EventFilter(stream="s-a"))
    a2 = hub.subscribe("k", t, 0, EventFilter(stream="s-a", types=frozenset({"X"})))
    b = hub.subscribe("k", t, 0, EventFilter(stream="s-b"))
    everything = hub.subscribe("k", t, 0, EVERYTHING)
    prefix = hub.subscribe("k", t, 0, EventFilter(stream_prefix="s-"))
    dashboard = hub.subscribe("k", t, 0, None)
    assert (hub.streams, hub.log_streams, hub.followed_streams) == (6, 5, 2)
    assert hub.interested("s-a") == {a1, a2, everything, prefix}
    assert hub.interested("s-b") == {b, everything, prefix}
    assert hub.interested("s-c") == {everything, prefix}
    hub.unsubscribe(a1)
    hub.unsubscribe(a1)  # twice is harmless
    assert hub.interested("s-a") == {a2, everything, prefix} and hub.followed_streams == 2
    hub.unsubscribe(a2)
    assert hub.interested("s-a") == {everything, prefix} and hub.followed_streams == 1
    again = hub.subscribe("k", t, 0, EventFilter(stream="s-a"))
    assert hub.interested("s-a") == {again, everything, prefix} and hub.followed_streams == 2
    for subscriber in (again, b, everything, prefix, dashboard):
        hub.unsubscribe(subscriber)
    assert (hub.streams, hub.followed_streams) == (0, 0)
    assert hub.interested("s-a") == set()


def test_a_stream_with_one_follower_and_then_more_and_then_one_again() -> None:
    """The index holds a lone follower as itself and several as a set: every change of that count
    keeps exactly the right followers reachable."""
    hub = bare_hub()
    t = Transport()
    first = hub.subscribe("k", t, 0, EventFilter(stream="s"))
    assert hub.interested("s") == {first}
    second = hub.subscribe("k", t, 0, EventFilter(stream="s"))
    third = hub.subscribe("k", t, 0, EventFilter(stream="s"))
    assert hub.interested("s") == {first, second, third} and hub.followed_streams == 1
    hub.unsubscribe(first)
    hub.unsubscribe(third)
    assert hub.interested("s") == {second}
    again = hub.subscribe("k", t, 0, EventFilter(stream="s"))
    assert hub.interested("s") == {second, again}
    hub.unsubscribe(again)
    hub.unsubscribe(second)
    assert hub.interested("s") == set() and hub.followed_streams == 0


def test_heartbeats_go_straight_to_streams_under_way_and_leave_checkpoints_due() -> None:
    """A heartbeat is a comment written to the socket (as the response frames it), only once the stream
    is under way and never after it left; it is no frame, so a checkpoint owed stays due."""
    hub = bare_hub(checkpoint_s=5.0)
    t = Transport()
    subscriber = hub.subscribe("k", t, 0, EventFilter(stream="s"))
    subscriber.beat()
    assert t.written == b""  # not under way yet: its response head may not have gone
    subscriber.heartbeat = frames.chunk(frames.PING)
    subscriber.position, subscriber.sent_at = 10, 0.0
    subscriber.beat()
    assert t.written == b"8\r\n: ping\n\n\r\n"
    assert subscriber.sent_at == 0.0 and hub.checkpoint_due(subscriber)
    hub.unsubscribe(subscriber)
    subscriber.beat()
    assert t.written == b"8\r\n: ping\n\n\r\n"  # its response ends after it leaves: nothing more


class Stalled(Transport):
    """A socket that has stopped draining."""

    def get_write_buffer_size(self) -> int:
        return 1 << 20

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def test_a_parked_rendering_follower_gets_its_rendered_events_without_being_woken() -> None:
    """A wallet stream asleep at its end: the tail renders its new events (through its own render, once
    each, in order) and writes them as one chunk; one whose socket stopped draining is woken instead,
    its events left unrendered for its own loop."""
    hub = bare_hub()
    hub.window.reset(0)
    rendered: dict[str, list[int]] = {"s-1": [], "s-2": []}

    def render_of(stream: str) -> Render:
        def render(events: list[RecordedEvent]) -> bytes:
            rendered[stream] += [e.position for e in events]
            return b"".join(b"id: %d\ndata: %s\n\n" % (e.position, e.type.encode()) for e in events)
        return render

    transport, stalled = Transport(), Stalled()
    follower = hub.subscribe("k", transport, 0, EventFilter(stream="s-1"), render=render_of("s-1"))
    stuck = hub.subscribe("k", stalled, 0, EventFilter(stream="s-2"), render=render_of("s-2"))
    for subscriber in (follower, stuck):
        subscriber.pushable = True
    asleep = {subscriber: subscriber.sleep() for subscriber in (follower, stuck)}
    events = [RecordedEvent(p, "s-1" if p != 3 else "s-2", 1, f"T{p}", {}, {}, uuid.uuid4(), datetime.now(UTC), b"")
              for p in (1, 2, 3, 4)]
    await hub._receive(0, events, 4)
    assert rendered == {"s-1": [1, 2, 4], "s-2": []}
    assert transport.written == frames.chunk(b"id: 1\ndata: T1\n\nid: 2\ndata: T2\n\nid: 4\ndata: T4\n\n")
    assert not asleep[follower].done() and (follower.position, follower.sent_position) == (4, 4)
    assert asleep[stuck].done() and stuck.position == 0 and stalled.written == b""
    for subscriber in (follower, stuck):
        subscriber.close()  # and its stall timer with it


class Closing(Transport):
    def is_closing(self) -> bool:
        return True


async def test_a_tick_serves_parked_streams_in_place_and_wakes_the_rest() -> None:
    """Every checkpoint interval: a parked stream with nothing of its own to read is moved to the
    window's end and sent the checkpoint it owes, straight to its socket, and left asleep; one with
    events to read, or whose client left, or a dashboard, is woken."""
    hub = bare_hub(checkpoint_s=5.0)
    hub.window.reset(0)
    hub.window.extend(item(p, "busy" if p == 3 else "other") for p in (1, 2, 3, 4))
    quiet_t, busy_t, everything_t = Transport(), Transport(), Transport()
    quiet = hub.subscribe("k", quiet_t, 1, EventFilter(stream="quiet"), render=lambda events: b"")
    busy = hub.subscribe("k", busy_t, 1, EventFilter(stream="busy"))
    everything = hub.subscribe("k", everything_t, 4, EVERYTHING)
    left = hub.subscribe("k", Closing(), 4, EventFilter(stream="quiet"))
    dashboard = hub.subscribe("k", Transport(), 0, None)
    subscribers = (quiet, busy, everything, left, dashboard)
    for subscriber in subscribers:
        subscriber.pushable, subscriber.sent_at = True, 0.0
    everything.sent_position = 4  # has everything: owes nothing
    asleep = {subscriber: subscriber.sleep() for subscriber in subscribers}
    hub._tick_slice(subscribers)
    assert quiet_t.written == frames.chunk(frames.checkpoint(4)) and not asleep[quiet].done()
    assert (quiet.position, quiet.sent_position) == (4, 4)
    assert everything_t.written == b"" and not asleep[everything].done()
    assert asleep[busy].done() and busy_t.written == b"" and busy.position == 1
    assert asleep[left].done() and asleep[dashboard].done()
    quiet_t.written = b""
    hub._tick_slice([quiet])  # it was just sent one: nothing owed
    assert quiet_t.written == b"" and not asleep[quiet].done()


def written_ids(transport: Transport) -> list[int]:
    return [int(line[4:]) for line in transport.written.decode().splitlines() if line.startswith("id: ")]


async def test_a_batch_reaches_exactly_the_matching_subscribers() -> None:
    """Parked one-stream subscribers get exactly their stream's events pushed (even when their position
    lags behind batches that held nothing for them); those of other streams are neither written to nor
    woken; a subscriber that cannot be pushed to (a wallet stream renders its own frames) is woken."""
    hub = bare_hub(checkpoint_s=3600.0)
    hub.window.reset(0)
    streams = [f"s-{i}" for i in range(6)]
    transports = {s: Transport() for s in streams}
    followers = {s: hub.subscribe("k", transports[s], 0, EventFilter(stream=s)) for s in streams}
    typed_transport = Transport()
    typed = hub.subscribe("k", typed_transport, 0, EventFilter(stream="s-0", types=frozenset({"X"})))
    rendering = hub.subscribe("k", Transport(), 0, EventFilter(stream="s-1"), render=lambda events: b"")
    everyone = [*followers.values(), typed, rendering]
    for subscriber in everyone:
        subscriber.pushable = subscriber.render is None
    sleeping = {subscriber: subscriber.sleep() for subscriber in everyone}
    await asyncio.sleep(0)

    expected: dict[str, list[int]] = {s: [] for s in streams}
    held: dict[int, Item] = {}
    position = 0
    for batch_streams in (["s-0", "s-1"], ["s-2", "s-2", "s-0"], ["s-3"], ["s-0", "s-5", "s-1"]):
        end = hub.window.end
        items = []
        for stream in batch_streams:
            position += 1
            items.append(item(position, stream, "X" if position % 2 else "Y"))
            held[position] = items[-1]
            expected[stream].append(position)
        hub.window.extend(items)
        hub._publish(items, end)

    await asyncio.sleep(0)
    for stream in streams:
        assert written_ids(transports[stream]) == expected[stream], stream
        assert not sleeping[followers[stream]].done()  # pushed to, never woken
    assert followers["s-4"].position == 0 and transports["s-4"].written == b""  # nothing of its stream
    assert written_ids(typed_transport) == [p for p in expected["s-0"] if p % 2]
    assert sleeping[rendering].done()  # woken to read (and render) its own events
    assert all(not task.done() for subscriber, task in sleeping.items() if subscriber is not rendering)
    for subscriber, task in sleeping.items():
        subscriber.close()
        await task
    # The pushed bytes are complete HTTP chunks of the shared frames.
    assert transports["s-3"].written == frames.chunk(held[6][4])


async def test_many_wallet_streams_each_get_exactly_their_own_events(make_client: MakeClient) -> None:
    client = await make_client()
    admin = await mint_token(client.app, "operator", ["admin"])
    reader = await mint_token(client.app, "erin", ["wallets:read"])
    wallets = [await open_wallet(client, admin, "erin") for _ in range(24)]
    streams = [await connect(client, f"/v1/streams/wallets/{w}", reader, after="now") for w in wallets[:12]]
    streams += [await connect(client, "/v1/streams/events", reader, after="now", stream=f"wallet-{w}")
                for w in wallets[12:]]
    hub = hub_of(client)
    await eventually(lambda: hub.followed_streams == 24)
    credits: dict[str, list[int]] = {w: [] for w in wallets}
    rounds = 3
    for r in range(rounds):
        answers = await asyncio.gather(*(
            post(client, admin, f"/v1/wallets/{w}/credits", {"amount": i + 1, "reference": f"r{r}-{i}"})
            for i, w in enumerate(wallets)))
        for w, answer in zip(wallets, answers, strict=True):
            credits[w].append(int(answer["position"]))
    for i, (wallet, sse) in enumerate(zip(wallets, streams, strict=True)):
        received = await sse.until(an_event_through(credits[wallet][-1]))
        events = [m for m in received if m.kind == "event"]
        assert [int(m.last_id) for m in events] == credits[wallet]
        assert {m.json()["stream_id"] for m in events} == {f"wallet-{wallet}"}
        if i < 12:  # the wallet stream's figures follow each credit
            assert [m.json()["wallet"]["balance"] for m in events] == [(i + 1) * n for n in range(1, rounds + 1)]
        sse.close()


def an_event_through(position: int) -> Callable[[Message], bool]:
    """Reading until an event at or beyond position."""
    return lambda message: message.kind == "event" and int(message.last_id) >= position
