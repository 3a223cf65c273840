"""API keys over real HTTP: create, list and revoke; the authentication cache; revocation seen by a
second app instance on the same database; expiry; per-key rate limits."""

from __future__ import annotations

import asyncio
import time
import typing
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import AUTHENTICATOR, REPOSITORY
from backend.clock import ManualClock
from backend.commands.api_keys import new_token
from backend.config import Settings
from backend.domain import SCOPES, ApiKey, hash_secret
from backend.http import models
from backend.http.ratelimit import RateLimiter
from backend.store.listener import Listener
from tests.conftest import bearer, make_settings, mint_token
from tests.support import Client, eventually, object_of, secret_of

PROBLEM = "application/problem+json"


async def call(client: Client, method: str, path: str, token: str | None, *, status: int,
               body: Any = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    sent = {**(bearer(token) if token else {}), **(headers or {})}
    response = await client.request(method, path, json=body, headers=sent)
    text = await response.text()
    assert response.status == status, text
    if status == 204:
        assert text == ""
        return {}
    if status >= 400:
        assert response.content_type == PROBLEM, text
    return await object_of(response)


async def probe(client: Client, token: str) -> int:
    """Status of an authenticated request that touches no database once the key is cached:
    a key without `admin` gets 403 from GET /v1/api-keys; an unusable key gets 401."""
    response = await client.get("/v1/api-keys", headers=bearer(token))
    await response.read()
    return response.status


async def wait_for_status(client: Client, token: str, status: int, timeout: float) -> float:
    """Poll until probe() answers status; return when (time.monotonic()) it first did."""

    async def answered() -> float | None:
        return time.monotonic() if await probe(client, token) == status else None

    return await eventually(answered, timeout=timeout, interval=0.01, what=f"a {status}")


@pytest.fixture
async def admin_token(client: Client) -> str:
    return await mint_token(client.app, "operator", ["admin"])


def unique(name: str) -> str:
    """Owners are per test: every test shares the session's database."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def new_key_body(owner: str = "alice", **overrides: Any) -> dict[str, Any]:
    return {"owner": owner, "name": f"{owner}'s service", "scopes": ["wallets:read"], **overrides}


# ---------------------------------------------------------------- create, list, revoke


async def test_create_list_and_revoke(client: Client, admin_token: str) -> None:
    alice = unique("alice")
    created = await call(client, "POST", "/v1/api-keys", admin_token, status=201,
                         body=new_key_body(alice, scopes=["wallets:write", "wallets:read"]))
    assert created["secret"].startswith(f"tly_{uuid.UUID(created['key_id']).hex}_")
    assert (created["owner"], created["name"], created["scopes"]) == (
        alice, f"{alice}'s service", ["wallets:read", "wallets:write"])
    assert created["expires_at"] is None and created["revoked"] is False and created["position"] > 0
    secret = created["secret"]
    assert await probe(client, secret) == 403  # authenticated, but not admin

    bob = await call(client, "POST", "/v1/api-keys", admin_token, status=201, body=new_key_body(unique("bob")))
    # Listings come from the api_keys read model: min_position waits for it to have seen that write.
    response = await client.get(f"/v1/api-keys?min_position={bob['position']}", headers=bearer(admin_token))
    listing = await response.text()
    assert response.status == 200, listing
    assert int(response.headers["X-Projection-Position"]) >= bob["position"]
    assert secret not in listing and secret_of(secret) not in listing
    assert hash_secret(secret) not in listing
    keys = (await response.json())["data"]
    assert all("secret" not in key and "secret_hash" not in key for key in keys)
    alice_only = (await call(client, "GET", f"/v1/api-keys?owner={alice}", admin_token, status=200))["data"]
    assert [key["key_id"] for key in alice_only] == [created["key_id"]]
    assert set(alice_only[0]) >= {"key_id", "owner", "name", "scopes", "created_at", "expires_at", "revoked"}
    assert alice_only[0]["revoked"] is False and alice_only[0]["version"] == created["version"] == 1
    assert alice_only[0]["scopes"] == ["wallets:read", "wallets:write"]

    stale = await call(client, "DELETE", f"/v1/api-keys/{created['key_id']}", admin_token, status=412,
                       headers={"If-Match": '"2"'})
    assert stale["code"] == "precondition_failed"
    assert await probe(client, secret) == 403  # If-Match failed: still a working key
    revoked = await client.delete(f"/v1/api-keys/{created['key_id']}",
                                  headers={**bearer(admin_token), "If-Match": '"1"'})
    assert revoked.status == 204
    assert await probe(client, secret) == 401  # the very next request
    after = (await call(client, "GET", f"/v1/api-keys?owner={alice}", admin_token, status=200,
                        headers={"X-Min-Position": revoked.headers["X-Position"]}))["data"]
    assert after[0]["revoked"] is True and after[0]["revoked_at"] is not None and after[0]["version"] == 2

    again = await call(client, "DELETE", f"/v1/api-keys/{created['key_id']}", admin_token, status=409)
    assert again["code"] == "invalid_transition"
    missing = await call(client, "DELETE", f"/v1/api-keys/{uuid.uuid4()}", admin_token, status=404)
    assert missing["code"] == "not_found"
    malformed = await call(client, "DELETE", "/v1/api-keys/not-a-uuid", admin_token, status=404)
    assert malformed["code"] == "not_found"


async def test_the_listing_pages_with_cursor_and_limit(client: Client, admin_token: str) -> None:
    """GET /v1/api-keys pages like every list: {data, has_more, next_cursor}, oldest first, each key once."""
    owner = unique("paged")
    made = [await call(client, "POST", "/v1/api-keys", admin_token, status=201, body=new_key_body(owner))
            for _ in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = f"owner={owner}&limit=2&min_position={made[-1]['position']}" + (f"&cursor={cursor}" if cursor else "")
        page = await call(client, "GET", f"/v1/api-keys?{params}", admin_token, status=200)
        assert set(page) == {"data", "has_more", "next_cursor"} and len(page["data"]) <= 2
        seen += [key["key_id"] for key in page["data"]]
        cursor = page["next_cursor"]
        assert page["has_more"] == (cursor is not None)
        if cursor is None:
            break
    assert seen == [key["key_id"] for key in made]
    for bad in ("limit=0", "limit=501", "cursor=%%%"):
        problem = await call(client, "GET", f"/v1/api-keys?{bad}", admin_token, status=400)
        assert problem["code"] == "validation_error"


async def test_created_key_works_and_expires_at_is_kept(client: Client, admin_token: str) -> None:
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    body = new_key_body("carol", scopes=["admin"], expires_at=expires.isoformat().replace("+00:00", "Z"))
    created = await call(client, "POST", "/v1/api-keys", admin_token, status=201, body=body)
    assert datetime.fromisoformat(created["expires_at"]) == expires
    made_by_new_key = await call(client, "POST", "/v1/api-keys", created["secret"], status=201,
                                 body=new_key_body("dave"))
    assert made_by_new_key["owner"] == "dave"
    for beyond in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"):  # no UTC equivalent: 422, not 500
        problem = await call(client, "POST", "/v1/api-keys", admin_token, status=422,
                             body=new_key_body("erin", expires_at=beyond))
        assert problem["errors"][0]["field"] == "expires_at", problem


async def test_secret_is_not_replayed_for_an_idempotency_key(client: Client, admin_token: str) -> None:
    headers = {"Idempotency-Key": "create-key-1"}
    owner = unique("idem")
    first = await client.post("/v1/api-keys", json=new_key_body(owner), headers={**bearer(admin_token), **headers})
    assert first.status == 201, await first.text()
    created = await first.json()
    second = await client.post("/v1/api-keys", json=new_key_body(owner), headers={**bearer(admin_token), **headers})
    assert second.status == 201, await second.text()
    assert second.headers["Idempotent-Replayed"] == "true"
    replayed = await second.json()
    assert "secret" not in replayed
    assert replayed == {k: v for k, v in created.items() if k != "secret"}
    assert created["secret"] not in await second.text()
    owned = (await call(client, "GET", f"/v1/api-keys?owner={owner}&min_position={created['position']}",
                        admin_token, status=200))["data"]
    assert [key["key_id"] for key in owned] == [created["key_id"]]  # one key, not two


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (new_key_body(scopes=["wallets:read", "root"]), "scopes.1"),
        (new_key_body(scopes=[]), "scopes"),
        (new_key_body(scopes="admin"), "scopes"),
        (new_key_body(owner=""), "owner"),
        (new_key_body(expires_at="2030-01-01T00:00:00"), "expires_at"),
        (new_key_body(expires_at=1_900_000_000), "expires_at"),
        (new_key_body(expires_at="1900000000"), "expires_at"),  # digits in a string: not a Unix time either
        (new_key_body(expires_at="2001-01-01T00:00:00Z"), "expires_at"),
        (new_key_body(secret_hash="0" * 64), "secret_hash"),
        ({"owner": "alice", "scopes": ["admin"]}, "name"),
    ],
)
async def test_create_rejects_bad_bodies_naming_the_field(
    client: Client, admin_token: str, body: dict[str, Any], field: str
) -> None:
    problem = await call(client, "POST", "/v1/api-keys", admin_token, status=422, body=body)
    assert problem["code"] == "validation_error"
    named = [error["field"] for error in problem.get("errors", [])] + [problem.get("field")]
    assert field in named, problem


def test_scope_names_match_the_domain() -> None:
    assert set(typing.get_args(models.Scope)) == SCOPES


async def test_non_admin_keys_get_403_on_every_key_endpoint(client: Client) -> None:
    token = await mint_token(client.app, "alice", sorted(SCOPES - {"admin"}))
    for method, path, body in [
        ("POST", "/v1/api-keys", new_key_body()),
        ("GET", "/v1/api-keys", None),
        ("GET", "/v1/api-keys?owner=alice", None),
        ("DELETE", f"/v1/api-keys/{uuid.uuid4()}", None),
    ]:
        problem = await call(client, method, path, token, status=403, body=body)
        assert problem["code"] == "forbidden"
    assert (await call(client, "GET", "/v1/api-keys", None, status=401))["code"] == "unauthorized"


# ---------------------------------------------------------------- authentication


async def test_unknown_malformed_and_wrong_secret_tokens_get_401(client: Client) -> None:
    token = await mint_token(client.app, "alice", ["wallets:read"])
    assert await probe(client, token) == 403
    _, unknown_token = new_token()
    wrong_secret = token.removesuffix(secret_of(token)) + "x" * 43  # same key id, another secret
    for bad in [unknown_token, wrong_secret, token + "x", "tly_nothing", token.upper()]:
        response = await client.get("/v1/api-keys", headers=bearer(bad))
        problem = await response.json(content_type=None)
        assert (response.status, problem["code"]) == (401, "unauthorized"), bad
        assert "invalid_token" in response.headers["WWW-Authenticate"]
    assert await probe(client, token) == 403  # a wrong secret does not poison the cached key


async def test_several_authorization_headers_are_a_400_whichever_comes_first(client: Client) -> None:
    """Authorization is one credential (RFC 9110, 11.6.2). With two, the first one used to win: a
    proxy, a log or a firewall rule in front that reads the other one judged a different caller than
    Tally did. Such a request is now refused before any key is looked at, in either order."""
    token = await mint_token(client.app, "two-headers", ["wallets:read"])
    _, unknown = new_token()
    for first, second in ((token, unknown), (unknown, token), (token, token)):
        headers = CIMultiDict([("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")])
        response = await client.get("/v1/wallets", params={"owner": "two-headers"}, headers=headers)
        problem = await response.json(content_type=None)
        assert (response.status, problem["code"]) == (400, "validation_error"), problem
        assert [error["field"] for error in problem["errors"]] == ["Authorization"], problem
    alone = await client.get("/v1/wallets", params={"owner": "two-headers"}, headers=bearer(token))
    assert alone.status == 200, await alone.text()


async def test_cached_keys_cost_no_database_lookup(client: Client) -> None:
    app = client.app
    authenticator = app[AUTHENTICATOR]
    token = await mint_token(app, "alice", ["wallets:read"])
    before = authenticator.loads
    statuses = await asyncio.gather(*(probe(client, token) for _ in range(20)))
    assert statuses == [403] * 20
    assert authenticator.loads == before + 1  # concurrent misses share one lookup

    async def no_database(*args: object, **kwargs: object) -> None:
        raise AssertionError("authentication went to the database")

    app[REPOSITORY].find = no_database  # type: ignore[method-assign]
    assert [await probe(client, token) for _ in range(5)] == [403] * 5
    assert authenticator.loads == before + 1


async def test_unknown_keys_are_remembered_only_briefly(client: Client) -> None:
    """A key id that was unknown when first seen works once the key exists and the negative TTL is
    over (another process's creation reaches this one no later); the test moves the clock."""
    app = client.app
    authenticator = app[AUTHENTICATOR]
    now = [time.monotonic()]
    authenticator.clock = lambda: now[0]
    key_id, token = new_token()
    assert await probe(client, token) == 401
    key = ApiKey.create(key_id, "alice", "late", ["wallets:read"], hash_secret(token), None, datetime.now(UTC))
    await app[REPOSITORY].save(key)
    loads = authenticator.loads
    assert await probe(client, token) == 401  # still remembered as unknown: no lookup
    assert authenticator.loads == loads
    now[0] += authenticator.negative_ttl_s - 0.01
    assert await probe(client, token) == 401
    now[0] += 0.02
    assert await probe(client, token) == 403  # the TTL is over: looked up, found
    assert authenticator.loads == loads + 1


async def test_revocation_is_seen_by_a_second_instance_within_a_second(
    aiohttp_client: AiohttpClient, client: Client, database_url: str, admin_token: str
) -> None:
    other = await aiohttp_client(create_app(make_settings(database_url)))
    created = await call(client, "POST", "/v1/api-keys", admin_token, status=201, body=new_key_body())
    token = created["secret"]
    assert await probe(other, token) == 403  # instance B has the key cached as valid
    assert await probe(other, token) == 403

    revoked_at = time.monotonic()
    response = await client.delete(f"/v1/api-keys/{created['key_id']}", headers=bearer(admin_token))
    assert response.status == 204, await response.text()
    seen = await wait_for_status(other, token, 401, timeout=5)
    assert seen - revoked_at < 1.0
    # B learnt it from the log (its copy was cached), not from a fresh lookup:
    assert other.app[AUTHENTICATOR].checkpoint >= int(response.headers["X-Position"])


async def test_revocation_without_notifications_is_found_by_polling(
    aiohttp_client: AiohttpClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Listener also polls, and the log tail follows its head: a revocation is applied even if no
    NOTIFY wakes anyone."""
    monkeypatch.setattr(Listener, "_on_notify", lambda *args: None)  # deaf to notifications: only the poll
    client = await aiohttp_client(create_app(make_settings(database_url)))
    key_id, token = new_token()
    key = ApiKey.create(key_id, "alice", "k", ["wallets:read"], hash_secret(token), None, datetime.now(UTC))
    await client.app[REPOSITORY].save(key)
    assert await probe(client, token) == 403
    key.revoke(datetime.now(UTC))
    await client.app[REPOSITORY].save(key)  # not through the endpoint: nothing marks it locally
    started = time.monotonic()
    seen = await wait_for_status(client, token, 401, timeout=5)
    assert seen - started < 1.0


async def test_the_revocation_tailer_moves_past_the_events_it_does_not_want(
    client: Client, admin_token: str
) -> None:
    """Its checkpoint follows the head, not the last revocation: else each read would scan every
    event appended since that revocation (measured: 25-35 ms a read after 100k events)."""
    authenticator = client.app[AUTHENTICATOR]
    created = await call(client, "POST", "/v1/wallets", admin_token, status=201,
                         body={"owner": "alice", "currency": "USD"})
    for _ in range(3):
        await call(client, "POST", f"/v1/wallets/{created['wallet_id']}/credits", admin_token, status=200,
                   body={"amount": 5, "reference": "r"})
    head = await client.app[REPOSITORY].store.head()
    assert await authenticator.catch_up() == 0
    assert authenticator.checkpoint == head

    revoked_key = await call(client, "POST", "/v1/api-keys", admin_token, status=201, body=new_key_body())
    response = await client.delete(f"/v1/api-keys/{revoked_key['key_id']}", headers=bearer(admin_token))
    assert response.status == 204
    await authenticator.catch_up()
    assert authenticator.checkpoint == await client.app[REPOSITORY].store.head()
    assert await probe(client, revoked_key["secret"]) == 401


async def test_expired_keys_get_401(aiohttp_client: AiohttpClient, settings: Settings) -> None:
    """A cached key stops working the moment the app's clock reaches its expires_at (the clock is moved)."""
    clock = ManualClock()
    client = await aiohttp_client(create_app(settings, clock))
    app = client.app
    past = clock.now() - timedelta(hours=2)
    key_id, token = new_token()
    expired = ApiKey.create(key_id, "alice", "old", ["wallets:read"], hash_secret(token), past + timedelta(hours=1),
                            past)
    await app[REPOSITORY].save(expired)
    assert await probe(client, token) == 401

    expires_at = clock.now() + timedelta(seconds=1.5)
    key_id, token = new_token()
    soon = ApiKey.create(key_id, "alice", "soon", ["wallets:read"], hash_secret(token), expires_at, clock.now())
    await app[REPOSITORY].save(soon)
    assert await probe(client, token) == 403  # valid, and now cached
    clock.advance(timedelta(seconds=1.5) - timedelta(microseconds=1))
    assert await probe(client, token) == 403  # a microsecond before its deadline
    clock.advance(timedelta(microseconds=1))
    assert clock.now() == expires_at
    assert await probe(client, token) == 401


# ---------------------------------------------------------------- rate limits


async def test_rate_limit_answers_429_with_retry_after(aiohttp_client: AiohttpClient, database_url: str) -> None:
    limited = await aiohttp_client(create_app(make_settings(database_url, rate_limit_per_s=0.5, rate_limit_burst=2)))
    app = limited.app
    token = await mint_token(app, "alice", ["wallets:read"])
    other = await mint_token(app, "bob", ["wallets:read"])
    assert [await probe(limited, token) for _ in range(2)] == [403, 403]
    response = await limited.get("/v1/api-keys", headers=bearer(token))
    problem = await response.json(content_type=None)
    assert response.status == 429, problem
    assert problem["code"] == "rate_limited" and response.content_type == PROBLEM
    assert response.headers["Retry-After"].isdigit() and int(response.headers["Retry-After"]) >= 1
    assert await probe(limited, other) == 403  # per key
    health = await limited.get("/health/live")
    assert health.status == 200  # no key, no limit


def test_token_bucket_refills_and_forgets_idle_buckets() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 3, max_buckets=10, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    assert limiter.acquire("b") == 0.0  # another key has its own bucket
    now[0] += 10  # long enough for both to be full again: they are dropped
    assert limiter.acquire("c") == 0.0
    assert len(limiter) == 1
    for i in range(50):
        limiter.acquire(f"key-{i}")
    assert len(limiter) == 10  # hard cap


def test_rate_limiter_refuses_a_zero_rate() -> None:
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(0, 10)
