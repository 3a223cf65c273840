"""The test client's SSE parser against the spec's rules; the window and filters on their own."""

from __future__ import annotations

import gc
import json
import uuid
from datetime import UTC, datetime

import pytest

from backend.store.events import RecordedEvent
from backend.streaming import frames
from backend.streaming.dashboard import StatsFeed
from backend.streaming.filters import EventFilter, InvalidFilter, UnknownTypes, parse_filter
from backend.streaming.window import POSITION, Item, Window, make_item
from tests.sse_client import Message, Parser


def parse(*chunks: bytes) -> tuple[Parser, list[Message]]:
    parser = Parser()
    messages = [m for chunk in chunks for m in parser.feed(chunk)]
    return parser, messages


def test_parser_follows_the_event_stream_rules() -> None:
    parser, messages = parse(
        b"\xef\xbb\xbf: a comment\nretry: 1500\n\n"
        b"id: 7\nevent: Moved\ndata: first\ndata:second\ndata\n\n"
        b"data: no id keeps the last one\r\n\r\n"
        b"id: 9\n\n"
        b"event: only-type\n\n"
        b"retry: soon\nid: 1\0\n\n"
        b"field-without-meaning: x\ndata: {\"a\": 1}\r\r"
    )
    assert parser.comments == ["a comment"]
    assert parser.retry_ms == 1500  # "soon" is not a number: ignored
    assert messages == [
        Message("event", "7", "Moved", "first\nsecond\n"),
        Message("event", "7", "message", "no id keeps the last one"),
        Message("checkpoint", "9"),
        Message("event", "9", "message", '{"a": 1}'),  # an id with NUL is ignored; type-only block: nothing
    ]


def test_parser_handles_any_chunking() -> None:
    wire = "id: 1\r\nevent: é\r\ndata: x\r\n\r\nid: 2\rdata: y\r\r: ping\n\nid: 3\n\n".encode()
    _, whole = parse(wire)
    for size in (1, 2, 3, 5):
        _, pieces = parse(*(wire[i : i + size] for i in range(0, len(wire), size)))
        assert pieces == whole
    assert [(m.kind, m.last_id, m.event) for m in whole] == [
        ("event", "1", "é"), ("event", "2", "message"), ("checkpoint", "3", "message")]


def item(position: int, stream: str = "s-1", type_: str = "T", owner: str | None = None) -> Item:
    event = RecordedEvent(position, stream, 1, type_, {}, {}, uuid.uuid4(), datetime.now(UTC), b"")
    return make_item(event, owner)


def test_window_keeps_the_latest_contiguous_events() -> None:
    window = Window(4)
    window.reset(10)
    window.extend(item(p) for p in range(11, 17))
    assert (window.start, window.end) == (12, 16)
    assert [i[POSITION] for i in window.after(12, 10)] == [13, 14, 15, 16]
    assert [i[POSITION] for i in window.after(13, 2)] == [14, 15]
    assert window.after(16, 10) == [] and window.after(20, 10) == []
    assert not window.covers(11)
    with pytest.raises(ValueError, match="behind"):
        window.after(11, 1)
    window.extend([item(20)])  # a gap cannot happen, but nobody may read across one
    assert (window.start, window.end) == (19, 20)


def test_filters_match_and_narrow_the_store_query() -> None:
    flt = parse_filter({"stream_prefix": "wallet-", "types": "WalletOpened, ChainTxClaimed,"})
    assert flt == EventFilter(stream_prefix="wallet-", types=frozenset({"WalletOpened", "ChainTxClaimed"}))
    assert flt.matches(item(1, "wallet-1", "WalletOpened")) and not flt.matches(item(1, "deposit-1", "WalletOpened"))
    assert not flt.matches(item(1, "wallet-1", "WalletCredited"))
    owned = EventFilter(owner="ann")
    assert owned.matches(item(1, "wallet-1", owner="ann")) and not owned.matches(item(1, "wallet-2", owner="bob"))
    sql, args = owned.query(5, 10)
    assert "starts_with(stream_id, $3)" in sql and args == [5, 10, "wallet-"]
    sql, args = EventFilter(stream="wallet-1", types=frozenset({"A"})).query(0, 10)
    assert "stream_id = $4" in sql and args == [0, 10, ["A"], "wallet-1"]
    assert EventFilter().everything and not owned.everything
    for bad in ({"types": " , "}, {"stream": ""}, {"stream_prefix": "x" * 300}):
        with pytest.raises(InvalidFilter):
            parse_filter(bad)
    with pytest.raises(UnknownTypes) as refused:  # a typo would match nothing, ever
        parse_filter({"types": "WalletOpened,WalletOpend,A"})
    assert (refused.value.field, refused.value.names) == ("types", frozenset({"WalletOpend", "A"}))


def test_window_items_are_invisible_to_the_cyclic_collector() -> None:
    window = Window(8)
    window.extend(item(p) for p in range(1, 9))
    gc.collect()
    assert not any(gc.is_tracked(i) for i in window.after(0, 8))


def test_stats_feed_deltas_carry_what_changed_since_a_position() -> None:
    woken: list[int] = []
    feed = StatsFeed(source=None, tail=None, interval_s=0.25,  # type: ignore[arg-type]
                     on_change=lambda: woken.append(feed.position))
    feed._update({"currencies": {"USD": {"credited": 1}, "EUR": {"credited": 5}}, "events": {"A": 2}}, 10)
    feed._update({"currencies": {"USD": {"credited": 3}, "EUR": {"credited": 5}}, "events": {"A": 3}}, 12)
    feed._update({"currencies": {"USD": {"credited": 3}, "EUR": {"credited": 6}}, "events": {"A": 4}}, 15)
    feed._update({"currencies": {"USD": {"credited": 9}}, "events": {}}, 14)  # behind: ignored
    assert woken == [10, 12, 15]
    assert feed.delta_since(12) == {"currencies": {"EUR": {"credited": 6}}, "events": {"A": 4}}
    assert feed.delta_since(10) == {"currencies": {"USD": {"credited": 3}, "EUR": {"credited": 6}}, "events": {"A": 4}}
    assert feed.delta_since(15) == {}


def test_frames_carry_integers_beyond_64_bits_as_their_exact_digits() -> None:
    value = {"total": 3 * (2**63 - 1), "rows": [-(2**70), 5, {"flag": True}], "small": 2**64 - 1}
    assert json.loads(frames.dumps(value)) == value
