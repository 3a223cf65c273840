"""Dashboards in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright; never a
downloaded browser) runs a page served from another origin against a real server.

The page is what a dashboard author would write without a manual: it trades its API key for a stream
token with fetch (the key travels in a header, never in a URL), then opens an EventSource that only
sets ``onmessage``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from backend.store.event_store import EventStore
from tests.conftest import bearer, mint_token
from tests.integration.streaming.conftest import MakeClient, connect, hub_of
from tests.support import Client, eventually

pytestmark = pytest.mark.timeout(180)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dashboard</title></head><body>
<script>
window.received = [];
window.walletReceived = [];
window.refused = 0;
window.errors = 0;
async function streamToken(api, key) {
  const answer = await fetch(api + "/v1/stream-tokens", {method: "POST", headers: {Authorization: "Bearer " + key}});
  if (!answer.ok) throw new Error("stream token: " + answer.status);
  return (await answer.json()).token;
}
async function tryFetch(url, token) {
  try {
    const answer = await fetch(url, {headers: {Authorization: "Bearer " + token}});
    return {status: answer.status, code: (await answer.json()).code};
  } catch (error) {
    return {failed: String(error)};
  }
}
function follow(url, into) {
  const source = new EventSource(url);
  source.onmessage = (m) => window[into].push({id: m.lastEventId, event: m.type, body: JSON.parse(m.data)});
  source.onerror = () => { window.errors += 1; window.state = source.readyState; };
  source.addEventListener("refused", () => { window.refused += 1; });
  window.sources = (window.sources || []).concat([source]);
}
</script></body></html>
"""


@pytest.fixture
async def browser_page(browser: Any) -> AsyncIterator[Any]:
    page = await browser.new_page()
    try:
        yield page
    finally:
        await page.close()


@pytest.fixture
async def page_origin() -> AsyncIterator[str]:
    """A second server, on another port (so another origin), serving the dashboard page."""

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def api_of(client: Client) -> str:
    return f"http://127.0.0.1:{client.server.port}"


async def open_page(page: Any, origin: str) -> list[str]:
    """Load the page; the URLs it requests from then on."""
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    await page.goto(origin + "/")
    return urls


async def until(page: Any, expression: str, timeout: float = 20.0) -> Any:
    """A page expression's value once it is truthy (a page offers the test no event to wait on)."""
    return await eventually(lambda: page.evaluate(expression), timeout=timeout, interval=0.05, what=expression)


async def call(client: Client, key: str, method: str, path: str, body: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    response = await client.request(method, path, json=body if body is not None else {}, headers=bearer(key))
    assert response.status < 300, (path, response.status, await response.text())
    answer: dict[str, Any] = await response.json()
    return answer


async def every_kind_of_event(client: Client, admin: str, owner: str) -> tuple[str, str]:
    """Credit, debit, lock, release, settle, reservations and a deposit: two wallets' ids."""
    a = (await call(client, admin, "POST", "/v1/wallets", {"owner": owner, "currency": "USD"}))["wallet_id"]
    b = (await call(client, admin, "POST", "/v1/wallets", {"owner": owner, "currency": "USD"}))["wallet_id"]
    await call(client, admin, "POST", f"/v1/wallets/{a}/credits", {"amount": 1000, "reference": "seed"})
    await call(client, admin, "POST", f"/v1/wallets/{a}/debits", {"amount": 100, "reference": "fee"})
    lock = (await call(client, admin, "POST", f"/v1/wallets/{a}/locks", {"amount": 50, "reason": "hold"}))["lock_id"]
    await call(client, admin, "POST", f"/v1/wallets/{a}/locks/{lock}/release")
    lock = (await call(client, admin, "POST", f"/v1/wallets/{a}/locks", {"amount": 70, "reason": "pay"}))["lock_id"]
    await call(client, admin, "POST", f"/v1/wallets/{a}/locks/{lock}/settle", {"to_wallet_id": b})
    reserve = {"amount": 30, "ttl_seconds": 600}
    kept = (await call(client, admin, "POST", f"/v1/wallets/{a}/reservations", reserve))["reservation_id"]
    await call(client, admin, "POST", f"/v1/wallets/{a}/reservations/{kept}/confirm", {"amount": 20})
    dropped = (await call(client, admin, "POST", f"/v1/wallets/{a}/reservations", reserve))["reservation_id"]
    await call(client, admin, "POST", f"/v1/wallets/{a}/reservations/{dropped}/rollback")
    deposit = (await call(client, admin, "POST", "/v1/deposits", {"wallet_id": a, "currency": "USD"}))["deposit_id"]
    await call(client, admin, "POST", f"/v1/deposits/{deposit}/status", {"status": "confirming", "confirmations": 1})
    await call(client, admin, "POST", f"/v1/deposits/{deposit}/status",
               {"status": "confirmed", "amount": 400, "chain_tx_id": "tx-browser", "confirmations": 6})
    return a, b


EVERY_KIND = {"WalletOpened", "WalletCredited", "WalletDebited", "FundsLocked", "LockReleased", "LockSettled",
              "SettlementReceived", "CreditReserved", "ReservationConfirmed", "ReservationRolledBack",
              "DepositCreated", "DepositConfirming", "DepositConfirmed", "DepositCredited", "ChainTxClaimed"}


async def test_a_page_on_another_origin_follows_every_event_with_onmessage_only(
        make_client: MakeClient, store: EventStore, browser_page: Any, page_origin: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client = await make_client(cors_allowed_origins=page_origin)
    admin = await mint_token(client.app, "operator", ["admin"])
    auditor = await mint_token(client.app, "auditor", ["audit:read"])
    owner_key = await mint_token(client.app, "olga", ["wallets:read"])
    api = api_of(client)
    urls = await open_page(browser_page, page_origin)
    start = await store.head()

    token = await browser_page.evaluate("([api, key]) => streamToken(api, key)", [api, auditor])
    assert token.startswith("tst_")
    await browser_page.evaluate("([url]) => follow(url, 'received')",
                                [f"{api}/v1/streams/events?after={start}&access_token={token}"])
    wallet, _ = await every_kind_of_event(client, admin, "olga")
    log = await store.read_all(start, 1000)
    expected = [(str(e.position), e.position, e.type, e.stream_id) for e in log]
    assert EVERY_KIND <= {e.type for e in log}
    await until(browser_page, f"window.received.length >= {len(expected)}")
    await asyncio.sleep(0.3)  # a duplicate would arrive right behind the last one
    received = await browser_page.evaluate("window.received")
    frames = [(m["id"], m["body"]["position"], m["body"]["type"], m["body"]["stream_id"]) for m in received]
    assert frames[:len(expected)] == expected
    # anything after them was appended since the log was read (other tests' reservations expiring in the
    # session's shared database): each once, in order
    later = [position for _, position, _, _ in frames[len(expected):]]
    assert later == sorted(set(later)) and all(position > log[-1].position for position in later)
    assert {m["event"] for m in received} == {"message"}

    # one wallet's stream, with its owner's key (through its own stream token): every event of it
    own = await browser_page.evaluate("([api, key]) => streamToken(api, key)", [api, owner_key])
    await browser_page.evaluate("([url]) => follow(url, 'walletReceived')",
                                [f"{api}/v1/streams/wallets/{wallet}?access_token={own}"])
    mine = [(e.position, e.type) for e in log if e.stream_id == f"wallet-{wallet}"]
    await until(browser_page, f"window.walletReceived.length >= {len(mine)}")
    wallet_frames = await browser_page.evaluate("window.walletReceived")
    assert [(m["body"]["position"], m["body"]["type"]) for m in wallet_frames] == mine
    assert wallet_frames[-1]["body"]["wallet"]["balance"] == 1000 - 100 - 70 - 20 + 400

    # the stream token is refused on the rest of the API
    other = await browser_page.evaluate("([url, token]) => tryFetch(url, token)", [f"{api}/v1/wallets", token])
    assert other == {"status": 403, "code": "forbidden"}
    # no long-lived key in any URL the page requested (nor in any log line); the tokens only in stream URLs
    assert urls and not [url for url in urls if "tly_" in url]
    assert all("/v1/streams/" in url for url in urls if "tst_" in url)
    for secret in (auditor, owner_key, token, own):
        assert secret not in caplog.text


async def test_without_cors_the_other_origin_page_fails(
        make_client: MakeClient, browser_page: Any, page_origin: str) -> None:
    client = await make_client()
    auditor = await mint_token(client.app, "auditor", ["audit:read"])
    api = api_of(client)
    await open_page(browser_page, page_origin)
    failed = await browser_page.evaluate("([url, key]) => tryFetch(url, key)", [f"{api}/v1/stream-tokens", auditor])
    assert "failed" in failed  # the preflight got no allow headers: fetch rejects
    await browser_page.evaluate("([url]) => follow(url, 'received')", [f"{api}/v1/streams/dashboard"])
    assert await until(browser_page, "window.state === 2")  # EventSource.CLOSED: given up for good
    assert await browser_page.evaluate("window.received.length") == 0


async def test_a_refused_stream_is_retried_by_the_browser_until_the_slot_frees(
        make_client: MakeClient, store: EventStore, browser_page: Any, page_origin: str) -> None:
    client = await make_client(cors_allowed_origins=page_origin, sse_max_streams_per_key=1, sse_retry_ms=300)
    admin = await mint_token(client.app, "operator", ["admin"])
    auditor = await mint_token(client.app, "auditor", ["audit:read"])
    api = api_of(client)
    await open_page(browser_page, page_origin)
    start = await store.head()
    holder = await connect(client, "/v1/streams/events", auditor, after="now")  # the key's one slot
    assert holder.status == 200 and (await holder.next()).kind == "checkpoint"

    # one wallet's events only: other tests' reservations expire in the session's shared database meanwhile
    wallet = (await call(client, admin, "POST", "/v1/wallets", {"owner": "ivan", "currency": "EUR"}))["wallet_id"]
    token = await browser_page.evaluate("([api, key]) => streamToken(api, key)", [api, auditor])
    await browser_page.evaluate("([url]) => follow(url, 'received')",
                                [f"{api}/v1/streams/events?stream=wallet-{wallet}&after={start}&access_token={token}"])
    await until(browser_page, "window.refused >= 2")  # refused, came back by itself, refused again
    assert await browser_page.evaluate("window.received.length") == 0  # its opening waits for the slot
    holder.close()
    hub = hub_of(client)
    await eventually(lambda: hub.streams <= 1)
    received = await until(browser_page, "window.received.length >= 1 && window.received")
    assert [(m["body"]["type"], m["body"]["stream_id"]) for m in received] == [("WalletOpened", f"wallet-{wallet}")]
    refusals = await browser_page.evaluate("window.refused")
    await call(client, admin, "POST", f"/v1/wallets/{wallet}/credits", {"amount": 5, "reference": "after"})
    frames = await until(browser_page, "window.received.length >= 2 && window.received")
    assert [m["body"]["type"] for m in frames] == ["WalletOpened", "WalletCredited"]
    assert await browser_page.evaluate("window.refused") == refusals  # the stream stayed open
