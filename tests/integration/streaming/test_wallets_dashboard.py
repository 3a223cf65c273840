"""Wallet streams (events with the figures after each) and the dashboard (snapshot, coalesced deltas)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from tests.conftest import bearer, make_settings, mint_token
from tests.integration.streaming.conftest import MakeClient, connect
from tests.support import Client

pytestmark = pytest.mark.timeout(120)


async def post(client: Client, token: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(path, json=body, headers=bearer(token))
    assert response.status < 300, await response.text()
    return dict(await response.json())


async def open_wallet(client: Client, token: str, owner: str, currency: str = "USD") -> str:
    return str((await post(client, token, "/v1/wallets", {"owner": owner, "currency": currency}))["wallet_id"])


async def test_wallet_stream_sends_figures_after_each_event(make_client: MakeClient) -> None:
    client = await make_client()
    admin = await mint_token(client.app, "operator", ["admin"])
    reader = await mint_token(client.app, "carol", ["wallets:read"])
    wallet = await open_wallet(client, admin, "carol")
    await post(client, admin, f"/v1/wallets/{wallet}/credits", {"amount": 500, "reference": "seed"})
    sse = await connect(client, f"/v1/streams/wallets/{wallet}", reader)
    history = await sse.events(2)
    assert [(m.event, m.json()["type"]) for m in history] == [("message", "WalletOpened"),
                                                             ("message", "WalletCredited")]
    assert history[1].json()["wallet"] == {"balance": 500, "available": 500, "locked": 0, "reserved": 0,
                                           "version": 2}
    await post(client, admin, f"/v1/wallets/{wallet}/locks", {"amount": 200, "reason": "escrow"})
    await post(client, admin, f"/v1/wallets/{wallet}/debits", {"amount": 100, "reference": "fee"})
    live = await sse.events(2)
    assert [(m.event, m.json()["type"]) for m in live] == [("message", "FundsLocked"), ("message", "WalletDebited")]
    assert live[1].json()["wallet"] == {"balance": 400, "available": 200, "locked": 200, "reserved": 0,
                                        "version": 4}
    assert live[1].json()["stream_id"] == f"wallet-{wallet}"
    sse.close()
    # Resuming mid-history folds the earlier events first: the figures are still right.
    resumed = await connect(client, f"/v1/streams/wallets/{wallet}", reader,
                            headers={"Last-Event-ID": history[1].last_id})
    (locked,) = await resumed.events(1)
    assert locked.json()["wallet"]["locked"] == 200 and locked.json()["wallet"]["balance"] == 500
    resumed.close()


async def test_dashboard_snapshot_then_coalesced_deltas(make_client: MakeClient) -> None:
    interval = 0.3
    client = await make_client(sse_dashboard_interval_s=interval)
    admin = await mint_token(client.app, "operator", ["admin"])
    viewer = await mint_token(client.app, "dana", ["wallets:read"])
    wallet = await open_wallet(client, admin, "dana", "EUR")
    sse = await connect(client, "/v1/streams/dashboard", viewer)
    assert sse.status == 200
    (snapshot,) = await sse.events(1)
    assert snapshot.event == "snapshot"
    body = snapshot.json()
    assert body["position"] == int(snapshot.last_id)
    stats = body["stats"]
    before = stats["currencies"].get("EUR", {}).get("credited", 0)

    credits = 60
    started = time.monotonic()
    answers = await asyncio.gather(*(
        post(client, admin, f"/v1/wallets/{wallet}/credits", {"amount": i + 1, "reference": f"r{i}"})
        for i in range(credits)))
    last_position = max(a["position"] for a in answers)
    deltas = await sse.until(lambda m: m.kind == "event" and int(m.last_id) >= last_position, timeout=30)
    elapsed = time.monotonic() - started
    frames = [m for m in deltas if m.kind == "event"]
    assert {m.event for m in frames} == {"stats"}
    ids = [int(snapshot.last_id)] + [int(m.last_id) for m in frames]
    assert ids == sorted(set(ids))  # strictly increasing
    # Coalesced: at most one frame per interval (plus the first one, and one of slack for the edges).
    assert len(frames) <= elapsed / interval + 2
    for frame in frames:  # last value wins: each delta carries the newest figures of what changed
        for section, entries in frame.json()["stats"].items():
            stats[section].update(entries)
    assert stats["currencies"]["EUR"]["credited"] == before + sum(range(1, credits + 1))
    assert stats["events"]["WalletCredited"] >= credits
    sse.close()


async def test_heartbeats_reach_wallet_and_dashboard_streams_between_whole_frames(make_client: MakeClient) -> None:
    """The hub's heartbeat comments reach every kind of stream, also while events flow: written
    between whole frames (and whole chunks), they never split one."""
    client = await make_client(sse_heartbeat_s=0.05)
    admin = await mint_token(client.app, "operator", ["admin"])
    wallet = await open_wallet(client, admin, "heidi")
    follower = await connect(client, f"/v1/streams/wallets/{wallet}", admin, after="now")
    dashboard = await connect(client, "/v1/streams/dashboard", admin)
    positions = []
    for i in range(20):
        positions.append(int((await post(client, admin, f"/v1/wallets/{wallet}/credits",
                                         {"amount": 1, "reference": f"hb-{i}"}))["position"]))
        await asyncio.sleep(0.01)
    received = await follower.until(lambda m: m.kind == "event" and int(m.last_id) >= positions[-1])
    events = [m for m in received if m.kind == "event"]
    assert [int(m.last_id) for m in events] == positions
    assert [m.json()["wallet"]["balance"] for m in events] == list(range(1, 21))
    assert follower.parser.comments and set(follower.parser.comments) == {"ping"}
    async with asyncio.timeout(10):
        while not dashboard.parser.comments:
            await dashboard.next()
    assert set(dashboard.parser.comments) == {"ping"}
    follower.close()
    dashboard.close()


async def test_the_dashboard_carries_totals_beyond_64_bits_exactly(
        aiohttp_client: AiohttpClient, own_database_url: str) -> None:
    """Each amount fits in 64 bits, a currency's total need not: three credits of 2^63 - 1 broke every
    dashboard stream (orjson refused the snapshot) until the totals came down, which they never do."""
    client = await aiohttp_client(create_app(make_settings(own_database_url)))
    admin = await mint_token(client.app, "operator", ["admin"])
    viewer = await mint_token(client.app, "erin", ["wallets:read"])
    largest = 2**63 - 1
    for _ in range(3):
        wallet = await open_wallet(client, admin, "erin", "JPY")
        credited = await post(client, admin, f"/v1/wallets/{wallet}/credits", {"amount": largest, "reference": "max"})
    stats = await client.get("/v1/stats", params={"min_position": str(credited["position"])}, headers=bearer(viewer))
    assert json.loads(await stats.read())["currencies"]["JPY"]["credited"] == 3 * largest
    sse = await connect(client, "/v1/streams/dashboard", viewer)
    assert sse.status == 200
    (snapshot,) = await sse.events(1)
    assert snapshot.event == "snapshot"
    assert json.loads(snapshot.data)["stats"]["currencies"]["JPY"]["credited"] == 3 * largest  # exact digits
    sse.close()
