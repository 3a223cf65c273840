"""Who may stream what (401/403 before the stream starts), the query token, and the stream limits."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from backend.appkeys import POOL
from backend.store.event_store import EventStore
from tests.conftest import mint_token
from tests.integration.ops.test_db_faults import pooled_queries_raise
from tests.integration.streaming.conftest import MakeClient, connect, hub_of
from tests.integration.streaming.test_wallets_dashboard import open_wallet, post
from tests.sse_client import Parser, Stream
from tests.support import eventually

pytestmark = pytest.mark.timeout(120)

PROBLEM = "application/problem+json"
STREAMS = ("/v1/streams/events", "/v1/streams/dashboard")


@pytest.mark.parametrize("path", STREAMS)
async def test_401_without_or_with_a_bad_key(make_client: MakeClient, path: str) -> None:
    client = await make_client()
    for token in (None, "tly_nope.nope"):
        sse = await connect(client, path, token)
        assert (sse.status, sse.response.content_type) == (401, PROBLEM)
        assert (await sse.response.json())["code"] == "unauthorized"
    sse = await connect(client, path, access_token="tly_nope.nope")
    assert sse.status == 401


@pytest.mark.parametrize("path", STREAMS)
async def test_403_without_a_read_scope(make_client: MakeClient, path: str) -> None:
    client = await make_client()
    writer = await mint_token(client.app, "erin", ["wallets:write"])
    sse = await connect(client, path, writer)
    assert (sse.status, sse.response.content_type) == (403, PROBLEM)
    assert (await sse.response.json())["code"] == "forbidden"


async def test_access_token_query_parameter_for_browsers(make_client: MakeClient) -> None:
    client = await make_client()
    token = await mint_token(client.app, "auditor", ["audit:read"])
    sse = await connect(client, "/v1/streams/events", access_token=token, after="now")
    assert sse.status == 200
    assert (await sse.next()).kind == "checkpoint"
    sse.close()
    # only the stream endpoints take it
    other = await client.get(f"/v1/wallets/{uuid.uuid4()}", params={"access_token": token})
    assert other.status == 401


async def test_a_key_sees_only_its_owners_wallets(make_client: MakeClient, store: EventStore) -> None:
    client = await make_client(sse_checkpoint_s=0.2)
    admin = await mint_token(client.app, "operator", ["admin"])
    frank = await mint_token(client.app, "frank", ["wallets:read"])
    auditor = await mint_token(client.app, "auditor", ["audit:read"])
    start = await store.head()
    mine = await open_wallet(client, admin, "frank")
    theirs = await open_wallet(client, admin, "grace")
    await post(client, admin, f"/v1/wallets/{theirs}/credits", {"amount": 5, "reference": "x"})
    last = await post(client, admin, f"/v1/wallets/{mine}/credits", {"amount": 7, "reference": "y"})

    async def streams_seen(token: str) -> set[str]:
        sse = await connect(client, "/v1/streams/events", token, after=start)
        seen = await sse.until(lambda m: int(m.last_id) >= last["position"])
        sse.close()
        return {m.json()["stream_id"] for m in seen if m.kind == "event"}

    assert await streams_seen(frank) == {f"wallet-{mine}"}
    assert {f"wallet-{mine}", f"wallet-{theirs}"} <= await streams_seen(auditor)

    forbidden = await connect(client, "/v1/streams/events", frank, stream=f"wallet-{theirs}")
    assert (forbidden.status, forbidden.response.content_type) == (403, PROBLEM)
    wallet = await connect(client, f"/v1/streams/wallets/{theirs}", frank)
    assert (wallet.status, wallet.response.content_type) == (403, PROBLEM)
    missing = await connect(client, "/v1/streams/wallets/00000000-0000-0000-0000-000000000000", frank)
    assert missing.status == 404
    allowed = await connect(client, f"/v1/streams/wallets/{theirs}", auditor)
    assert allowed.status == 200
    allowed.close()


async def refusal(sse: Stream, retry_ms: int = 1500) -> dict[str, Any]:
    """A refused stream: 200 text/event-stream with retry advice and one `refused` frame, then its end
    (read() returns: the answer ended)."""
    assert (sse.status, sse.response.content_type) == (200, "text/event-stream")
    body = await sse.response.read()
    parser = Parser()
    messages = parser.feed(body)
    assert parser.retry_ms == retry_ms
    assert [m.event for m in messages] == ["refused"]
    problem: dict[str, Any] = messages[0].json()
    assert sse.response.headers["X-Stream-Refused"] == problem["code"]
    assert int(sse.response.headers["Retry-After"]) == problem["retry_after"] >= 1
    return problem


async def test_per_key_limit_and_process_cap_are_refusals_a_browser_retries(make_client: MakeClient) -> None:
    client = await make_client(sse_max_streams_per_key=2, sse_max_streams=3, sse_retry_ms=1500)
    one = await mint_token(client.app, "auditor", ["audit:read"])
    two = await mint_token(client.app, "auditor", ["audit:read"])
    open_streams = [await connect(client, "/v1/streams/events", one, after="now") for _ in range(2)]
    for sse in open_streams:
        await sse.next()
    refused = await connect(client, "/v1/streams/events", one, after="now")
    problem = await refusal(refused)
    assert (problem["status"], problem["code"], problem["retry_after"]) == (429, "rate_limited", 2)
    open_streams.append(await connect(client, "/v1/streams/dashboard", two))
    await open_streams[-1].next()
    full = await connect(client, "/v1/streams/events", two, after="now")
    assert (await refusal(full))["code"] == "unavailable"
    for sse in open_streams:
        sse.close()
    hub = hub_of(client)
    await eventually(lambda: hub.streams == 0)  # the server notices the closed connections
    again = await connect(client, "/v1/streams/events", one, after="now")
    assert again.status == 200
    again.close()


async def test_a_stream_asked_for_during_shutdown_is_a_refusal_a_browser_retries(make_client: MakeClient) -> None:
    client = await make_client(sse_retry_ms=1500)
    token = await mint_token(client.app, "auditor", ["audit:read"])
    await hub_of(client).shutdown()  # what on_shutdown does first: from here on new streams are refused
    refused = await connect(client, "/v1/streams/events", token, after="now")
    problem = await refusal(refused)
    assert (problem["status"], problem["code"]) == (503, "unavailable")
    assert "shutting down" in problem["detail"]
    # authentication failures still stop a browser: an ordinary problem+json answer
    unknown = await connect(client, "/v1/streams/events", "tly_nope.nope")
    assert (unknown.status, unknown.response.content_type) == (401, PROBLEM)


async def test_a_stream_asked_for_while_the_database_is_down_is_a_refusal_a_browser_retries(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A browser reconnecting while the database restarts must come back once it is up: a 503
    problem+json answer would make its EventSource give up for good."""
    client = await make_client(sse_retry_ms=1500)
    admin = await mint_token(client.app, "operator", ["admin"])
    wallet = await open_wallet(client, admin, "dora")
    down = ConnectionRefusedError(111, "Connection refused")
    with pooled_queries_raise(monkeypatch, down, pool=client.app[POOL]):
        for path, query in (("/v1/streams/events", {"after": "now"}), (f"/v1/streams/wallets/{wallet}", {}),
                            ("/v1/streams/dashboard", {})):
            refused = await connect(client, path, admin, query=query)
            problem = await refusal(refused)
            assert (problem["status"], problem["code"]) == (503, "unavailable"), path
    assert hub_of(client).streams == 0
    back = await connect(client, f"/v1/streams/wallets/{wallet}", admin)
    assert (await back.events(1))[0].json()["type"] == "WalletOpened"
    back.close()


async def test_a_stream_over_the_keys_request_rate_is_a_refusal_a_browser_retries(make_client: MakeClient) -> None:
    """Browsers sharing a key all reconnect at once after a restart: those beyond the key's request
    rate must come back later, not be stopped for good by a 429 problem+json answer."""
    client = await make_client(sse_retry_ms=1500, rate_limit_per_s=0.01, rate_limit_burst=1)
    token = await mint_token(client.app, "auditor", ["audit:read"])
    first = await connect(client, "/v1/streams/events", token, after="now")
    assert first.status == 200
    refused = await connect(client, "/v1/streams/events", token, after="now")
    problem = await refusal(refused, retry_ms=100_000)
    assert (problem["status"], problem["code"]) == (429, "rate_limited")
    first.close()
