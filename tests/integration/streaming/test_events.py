"""/v1/streams/events over a real socket: frames, filters, resume, checkpoints, heartbeats."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from backend.domain.registry import LOGGED_TYPES
from backend.store.event_store import EventStore
from tests.conftest import mint_token
from tests.integration.streaming.conftest import (
    MakeClient,
    append,
    append_wallet,
    connect,
    new_stream,
    new_wallet_stream,
)

pytestmark = pytest.mark.timeout(60)

NEVER_HERE = "DepositExpired"
"""A type no test of this module appends, for a filter that lets nothing through."""


async def test_frames_carry_position_type_and_the_event(make_client: MakeClient, store: EventStore) -> None:
    client = await make_client()
    token = await mint_token(client.app, "auditor", ["audit:read"])
    stream_id = new_stream()
    positions = await append(store, stream_id, "Opened", "Moved", n=7)
    start = positions[0] - 1  # the two events follow it at once, whatever else the session's apps append
    sse = await connect(client, "/v1/streams/events", token, after=start)
    assert sse.status == 200 and sse.response.content_type == "text/event-stream"
    first = await sse.next()
    assert (first.kind, first.last_id) == ("checkpoint", str(start))
    assert sse.parser.retry_ms == 3000
    events = await sse.events(2)
    # unnamed frames (what onmessage receives): the type travels in the data
    assert [(m.last_id, m.event, m.json()["type"]) for m in events] == [
        (str(positions[0]), "message", "Opened"), (str(positions[1]), "message", "Moved")]
    body = events[1].json()
    assert set(body) == {"position", "stream_id", "version", "type", "data", "recorded_at"}
    assert (body["position"], body["stream_id"], body["version"], body["type"], body["data"]) == (
        positions[1], stream_id, 2, "Moved", {"n": 7})
    assert body["recorded_at"].endswith("Z")
    sse.close()
    # ?event_names=true names each frame by its type (per-type listeners); same ids, same bodies
    named = await connect(client, "/v1/streams/events", token, after=start, stream=stream_id, event_names="true")
    again = await named.events(2)
    assert [(m.last_id, m.event) for m in again] == [(str(positions[0]), "Opened"), (str(positions[1]), "Moved")]
    assert again[1].json() == body
    named.close()
    bad = await connect(client, "/v1/streams/events", token, event_names="yes")
    assert (bad.status, (await bad.response.json())["code"]) == (400, "validation_error")


async def test_filters_by_stream_prefix_and_types(make_client: MakeClient, store: EventStore) -> None:
    client = await make_client(sse_checkpoint_s=0.2)  # a checkpoint tells when the filtered-out end is reached
    token = await mint_token(client.app, "auditor", ["audit:read"])
    start = await store.head()
    alpha, beta = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    one, other = new_wallet_stream(alpha), new_wallet_stream(beta)
    a = await append_wallet(store, one, "WalletOpened", "WalletCredited", "WalletDebited")
    b = await append_wallet(store, other, "WalletOpened", "WalletCredited")
    end = (await append_wallet(store, new_wallet_stream(), "WalletOpened"))[0]

    async def received(**params: str | int) -> list[int]:
        sse = await connect(client, "/v1/streams/events", token, query={"after": start, **params})
        seen = await sse.until(lambda m: int(m.last_id) >= end)
        sse.close()
        return [int(m.last_id) for m in seen if m.kind == "event"]

    assert await received(stream=one) == a
    assert await received(stream_prefix=f"wallet-{beta}") == b
    assert await received(types="WalletCredited,WalletDebited") == [a[1], a[2], b[1]]
    assert await received(stream_prefix=f"wallet-{alpha}", types="WalletOpened") == [a[0]]
    assert await received(stream=other, types="WalletDebited") == []  # the checkpoint at the end still arrives


async def test_an_unknown_event_type_is_a_400_not_a_silent_stream(make_client: MakeClient) -> None:
    """A typo in `types` would match nothing, ever: the stream would look like a quiet log."""
    client = await make_client()
    token = await mint_token(client.app, "auditor", ["audit:read"])
    sse = await connect(client, "/v1/streams/events", token, types="WalletCredited,WalletCreditted,Nope")
    assert sse.status == 400 and sse.response.content_type == "application/problem+json"
    body = await sse.response.json()
    assert (body["code"], body["field"]) == ("unknown_event_type", "types")
    assert body["unknown"] == ["Nope", "WalletCreditted"]
    # every type the log holds is taken, the one outside the aggregates too
    known = await connect(client, "/v1/streams/events", token, types=",".join(sorted(LOGGED_TYPES)), after="now")
    assert known.status == 200
    known.close()


async def test_resume_from_after_last_event_id_and_now(make_client: MakeClient, store: EventStore) -> None:
    client = await make_client()
    token = await mint_token(client.app, "auditor", ["audit:read"])
    stream_id = new_stream()
    p = await append(store, stream_id, "A", "B", "C", "D")

    async def first_event(headers: dict[str, str] | None = None, **params: str | int) -> int:
        sse = await connect(client, "/v1/streams/events", token, headers=headers, query={"stream": stream_id, **params})
        (message,) = await sse.events(1)
        sse.close()
        return int(message.last_id)

    assert await first_event(after=p[0]) == p[1]
    assert await first_event(headers={"Last-Event-ID": str(p[1])}) == p[2]
    # A browser reconnecting sends its URL again plus Last-Event-ID, which is further along: it counts.
    assert await first_event(after=p[0], headers={"Last-Event-ID": str(p[2])}) == p[3]
    assert await first_event(after=p[1], headers={"Last-Event-ID": str(p[0])}) == p[2]

    sse = await connect(client, "/v1/streams/events", token, stream=stream_id, after="now")
    opening = await sse.next()
    assert opening.kind == "checkpoint" and int(opening.last_id) >= p[3]
    later = await append(store, stream_id, "E")
    (message,) = await sse.events(1)
    assert int(message.last_id) == later[0]
    sse.close()
    # after=now never skips past a Last-Event-ID (a browser reconnecting to an after=now URL)
    assert await first_event(after="now", headers={"Last-Event-ID": str(p[2])}) == p[3]


@pytest.mark.parametrize("params", [{"after": "-1"}, {"after": "x"}, {"types": ""}, {"stream": ""}])
async def test_bad_parameters_are_problems_before_the_stream(make_client: MakeClient, params: dict[str, str]) -> None:
    client = await make_client()
    token = await mint_token(client.app, "auditor", ["audit:read"])
    sse = await connect(client, "/v1/streams/events", token, query=params)
    assert sse.status == 400
    assert sse.response.content_type == "application/problem+json"
    assert (await sse.response.json())["code"] == "validation_error"


async def test_rarely_matching_filter_gets_checkpoints(make_client: MakeClient, store: EventStore) -> None:
    client = await make_client(sse_checkpoint_s=0.2)
    token = await mint_token(client.app, "auditor", ["audit:read"])
    start = await store.head()
    sse = await connect(client, "/v1/streams/events", token, after=start, types=NEVER_HERE)
    assert (await sse.next()).last_id == str(start)
    positions = await append(store, new_stream(), *["Noise"] * 5)
    seen = await sse.until(lambda m: int(m.last_id) >= positions[-1])
    assert all(m.kind == "checkpoint" for m in seen)
    assert [int(m.last_id) for m in seen] == sorted(int(m.last_id) for m in seen)
    sse.close()


async def test_heartbeat_comments(make_client: MakeClient) -> None:
    client = await make_client(sse_heartbeat_s=0.1)
    token = await mint_token(client.app, "auditor", ["audit:read"])
    sse = await connect(client, "/v1/streams/events", token, after="now", types=NEVER_HERE)
    await sse.next()
    async with asyncio.timeout(10):
        while not sse.parser.comments:
            sse.parser.feed(await sse.response.content.readany())
    assert sse.parser.comments[0] == "ping"
    sse.close()


async def test_a_resume_position_beyond_the_log_is_a_400_not_a_silent_skip(make_client: MakeClient,
                                                                          store: EventStore) -> None:
    """A stream resumed beyond the head would wait there and skip every event up to it when they come
    (a Last-Event-ID kept across a restore from backup, say): refused, naming where the log ends."""
    client = await make_client()
    token = await mint_token(client.app, "auditor", ["audit:read"])
    (last,) = await append(store, new_stream(), "E")
    refused = [({"after": str(last + 5)}, {}, "after"), ({}, {"Last-Event-ID": str(last + 1)}, "Last-Event-ID"),
               ({"after": "now"}, {"Last-Event-ID": str(last + 1)}, "Last-Event-ID")]
    for params, headers, field in refused:
        sse = await connect(client, "/v1/streams/events", token, headers=headers, query=params)
        problem = await sse.response.json()
        assert (sse.status, problem["code"], problem["field"]) == (400, "validation_error", field), problem
        assert f"head of the log ({last})" in problem["detail"]
    sse = await connect(client, "/v1/streams/events", token, headers={"Last-Event-ID": str(last)})
    assert sse.status == 200  # the head itself is where a caught-up client resumes
    sse.close()
