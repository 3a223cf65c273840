"""CORS (CORS_ALLOWED_ORIGINS), stream tokens (POST /v1/stream-tokens) and the event types in
/openapi.json, over real HTTP; tests/integration/streaming/test_browser.py drives the same in Chromium."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from backend.appkeys import AUTHENTICATOR, HUB, REPOSITORY, SETTINGS, STREAM_TOKENS
from backend.commands.api_keys import mint, parse_token
from backend.config import ConfigError, load_settings
from backend.domain.registry import EVENT_TYPES
from backend.http.signed_tokens import StreamTokens
from tests.conftest import bearer, mint_token
from tests.integration.streaming.conftest import MakeClient, connect
from tests.integration.streaming.test_wallets_dashboard import open_wallet, post

pytestmark = pytest.mark.timeout(120)

DASH = "http://dash.example:8000"
PREFLIGHT = {"Origin": DASH, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, idempotency-key, content-type"}


async def test_cors_for_listed_origins_only(make_client: MakeClient) -> None:
    client = await make_client(cors_allowed_origins=f"{DASH}, https://other.example")
    token = await mint_token(client.app, "auditor", ["audit:read"])
    preflight = await client.options("/v1/wallets", headers=PREFLIGHT)
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == DASH
    allowed = {h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "idempotency-key", "content-type", "if-match", "last-event-id", "x-min-position",
            "prefer", "x-request-id", "x-correlation-id", "if-none-match"} <= allowed
    methods = {m.strip() for m in preflight.headers["Access-Control-Allow-Methods"].split(",")}
    assert methods == {route.method for route in client.app.router.routes()}  # nothing the API does not route
    # an unlisted origin's preflight: no allow headers (the ordinary 405 to OPTIONS)
    stranger = await client.options("/v1/wallets", headers={**PREFLIGHT, "Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in stranger.headers
    assert stranger.status == 405
    # answers, errors and streams name a listed origin and expose the headers a client reads
    refused = await client.get("/v1/wallets", headers={"Origin": DASH})
    assert (refused.status, refused.headers["Access-Control-Allow-Origin"]) == (401, DASH)
    assert "X-Request-ID" in refused.headers["Access-Control-Expose-Headers"]
    sse = await connect(client, "/v1/streams/events", token, headers={"Origin": DASH}, after="now")
    assert sse.status == 200 and sse.response.headers["Access-Control-Allow-Origin"] == DASH
    exposed = {h.strip() for h in sse.response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"X-Position", "X-Projection-Position", "ETag", "Retry-After", "Idempotent-Replayed", "X-Request-ID",
            "Location", "X-Stream-Refused"} <= exposed
    assert "Origin" in sse.response.headers["Vary"]
    sse.close()
    other = await client.get("/v1/wallets", headers={"Origin": "http://evil.example", **bearer(token)})
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_no_cors_unless_configured(make_client: MakeClient) -> None:
    client = await make_client()
    preflight = await client.options("/v1/wallets", headers=PREFLIGHT)
    assert preflight.status == 405 and "Access-Control-Allow-Origin" not in preflight.headers
    answer = await client.get("/health/live", headers={"Origin": DASH})
    assert "Access-Control-Allow-Origin" not in answer.headers and "Vary" not in answer.headers


async def test_bad_origins_setting_is_refused() -> None:
    for bad in ("*", "https://dash.example/app", "dash.example"):
        with pytest.raises(ConfigError, match="CORS_ALLOWED_ORIGINS"):
            load_settings(cors_allowed_origins=bad)


async def test_stream_token_opens_streams_and_nothing_else(make_client: MakeClient) -> None:
    client = await make_client(stream_token_ttl_s=30)
    admin = await mint_token(client.app, "operator", ["admin"])
    reader = await mint_token(client.app, "frank", ["wallets:read"])
    issued = await client.post("/v1/stream-tokens", headers=bearer(reader))
    assert issued.status == 200 and issued.headers["Cache-Control"] == "no-store"
    body = await issued.json()
    assert set(body) == {"token", "expires_at"}
    left = datetime.fromisoformat(body["expires_at"]).timestamp() - time.time()
    assert 29 <= left <= 31
    token = body["token"]
    for _ in range(2):  # reusable until it expires
        sse = await connect(client, "/v1/streams/events", access_token=token, after="now")
        assert sse.status == 200
        assert (await sse.next()).kind == "checkpoint"
        sse.close()
    # the key's owner and scopes: frank's stream token may not follow another owner's wallet
    wallet = (await (await client.post("/v1/wallets", json={"owner": "grace", "currency": "USD"},
                                       headers=bearer(admin))).json())["wallet_id"]
    theirs = await connect(client, f"/v1/streams/wallets/{wallet}", access_token=token)
    assert (theirs.status, (await theirs.response.json())["code"]) == (403, "forbidden")
    # refused on every other endpoint, as a header or a query parameter, and cannot mint more tokens
    for method, path in (("GET", "/v1/wallets"), ("GET", f"/v1/wallets/{wallet}"), ("POST", "/v1/stream-tokens"),
                         ("GET", f"/v1/streams/wallet-{wallet}/events")):
        answer = await client.request(method, path, headers=bearer(token))
        assert answer.status == 403 and answer.content_type == "application/problem+json", path
        assert (await answer.json())["code"] == "forbidden"
    query = await client.get("/v1/wallets", params={"access_token": token})
    assert query.status == 401


async def test_stream_tokens_expire_are_signed_and_die_with_their_key(make_client: MakeClient) -> None:
    client = await make_client()
    auditor = await mint_token(client.app, "auditor", ["audit:read"])
    admin = await mint_token(client.app, "operator", ["admin"])
    tokens: StreamTokens = client.app[STREAM_TOKENS]
    issued = await (await client.post("/v1/stream-tokens", headers=bearer(auditor))).json()
    token = issued["token"]
    key_id = tokens.verify(token)
    assert key_id is not None
    expired, _ = tokens.issue(key_id, now=time.time() - 120)
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    other_secret, _ = StreamTokens(b"another process's secret", 60).issue(key_id)
    not_ascii = (f"tst_{key_id.hex}_\u00b2_{token.rsplit('_', 1)[1]}", token[:-1] + "\u00e9")
    for bad in (expired, forged, other_secret, "tst_nope", f"tst_{key_id.hex}_99999999999_x", *not_ascii):
        sse = await connect(client, "/v1/streams/events", access_token=bad)
        assert (sse.status, (await sse.response.json())["code"]) == (401, "unauthorized"), bad
        read = await client.get("/v1/wallets", headers={"Authorization": f"Bearer {bad}"})
        assert (read.status, (await read.json(content_type=None))["code"]) == (401, "unauthorized"), bad
    # every process with the same settings verifies it (stateless, shared secret)
    assert StreamTokens.from_settings(client.app[SETTINGS]).verify(token) == key_id
    revoked = await client.delete(f"/v1/api-keys/{key_id}", headers=bearer(admin))
    assert revoked.status == 204
    sse = await connect(client, "/v1/streams/events", access_token=token)
    assert sse.status == 401


async def test_openapi_lists_every_event_type_with_its_data(make_client: MakeClient) -> None:
    client = await make_client()
    document = await (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    types = set(EVENT_TYPES) | {"ChainTxClaimed"}
    assert set(schemas["StreamEvent"]["discriminator"]["mapping"]) == types
    credited = schemas["WalletCreditedEvent"]
    assert credited["properties"]["type"] == {"const": "WalletCredited"}
    assert credited["properties"]["data"]["properties"]["amount"] == {"type": "integer"}
    assert "stream_id" in credited["required"]
    stream = document["paths"]["/v1/streams/events"]["get"]
    data = stream["responses"]["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"]
    assert data["contentSchema"] == {"$ref": "#/components/schemas/StreamEvent"}
    assert "event_names" in {p["name"] for p in stream["parameters"]}


async def test_revoking_a_key_ends_its_open_streams_in_every_process(make_client: MakeClient) -> None:
    """A revoked key loses what it already had open too, here and in another process; others' streams
    go on. The end is clean, so a browser reconnects and is then refused for good (401)."""
    here, there = await make_client(), await make_client()
    admin = await mint_token(here.app, "operator", ["admin"])
    owner = await mint_token(here.app, "erin", ["wallets:read"])
    bystander = await mint_token(here.app, "erin", ["wallets:read"])
    wallet = await open_wallet(here, admin, "erin")
    token = (await (await here.post("/v1/stream-tokens", headers=bearer(owner))).json())["token"]
    streams = [await connect(here, "/v1/streams/events", access_token=token),
               await connect(here, f"/v1/streams/wallets/{wallet}", access_token=token),
               await connect(here, "/v1/streams/dashboard", access_token=token),
               await connect(there, f"/v1/streams/wallets/{wallet}", owner)]
    other = await connect(here, f"/v1/streams/wallets/{wallet}", bystander, after="now")
    for sse in (*streams, other):
        assert sse.status == 200
        await sse.next()
    key_id = parse_token(owner)
    assert (await here.delete(f"/v1/api-keys/{key_id}", headers=bearer(admin))).status == 204
    for sse in streams:
        await sse.drain_to_end()
        assert sse.ended
    await post(here, admin, f"/v1/wallets/{wallet}/credits", {"amount": 5, "reference": "after"})
    assert (await other.events(1))[0].json()["type"] == "WalletCredited"
    again = await connect(here, "/v1/streams/events", access_token=token)
    assert again.status == 401
    other.close()


async def test_a_key_that_expires_ends_its_open_streams(make_client: MakeClient) -> None:
    """As a revocation does: the streams a key opened end when it expires, cleanly, and a reconnect is
    refused (401); a stream of a key that does not expire goes on."""
    client = await make_client()
    admin = await mint_token(client.app, "operator", ["admin"])
    wallet = await open_wallet(client, admin, "gus")
    minted = mint("gus", "expiring", ["wallets:read"], datetime.now(UTC) + timedelta(seconds=2), datetime.now(UTC))
    await client.app[REPOSITORY].save(minted.key)
    lasting = await mint_token(client.app, "gus", ["wallets:read"])
    token = (await (await client.post("/v1/stream-tokens", headers=bearer(minted.token))).json())["token"]
    streams = [await connect(client, "/v1/streams/events", access_token=token),
               await connect(client, f"/v1/streams/wallets/{wallet}", minted.token)]
    other = await connect(client, f"/v1/streams/wallets/{wallet}", lasting, after="now")
    for sse in (*streams, other):
        assert sse.status == 200
        await sse.next()
    for sse in streams:
        await sse.drain_to_end(timeout=15)
        assert sse.ended
    await post(client, admin, f"/v1/wallets/{wallet}/credits", {"amount": 5, "reference": "after"})
    assert (await other.events(1))[0].json()["type"] == "WalletCredited"
    again = await connect(client, f"/v1/streams/wallets/{wallet}", minted.token)
    assert again.status == 401
    other.close()


async def test_a_key_revoked_while_its_stream_is_being_admitted_gets_no_stream(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()
    admin = await mint_token(client.app, "operator", ["admin"])
    owner = await mint_token(client.app, "fay", ["wallets:read"])
    wallet = await open_wallet(client, admin, "fay")
    repository, key_id = client.app[REPOSITORY], parse_token(owner)
    assert key_id is not None
    as_of = repository.as_of

    async def revoked_meanwhile(*args: Any, **kwargs: Any) -> Any:
        client.app[AUTHENTICATOR].mark_revoked(key_id)  # what the log tail does on ApiKeyRevoked
        return await as_of(*args, **kwargs)

    monkeypatch.setattr(repository, "as_of", revoked_meanwhile)
    sse = await connect(client, f"/v1/streams/wallets/{wallet}", owner)
    assert sse.status == 401
    assert client.app[HUB].streams == 0
