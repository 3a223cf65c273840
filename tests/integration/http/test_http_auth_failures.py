"""Failed authentication is cheap and limited, over real HTTP: an unknown key id costs one lookup, then
none; a client address that keeps failing gets 429 with Retry-After and no lookup, while other
addresses (told apart by X-Forwarded-For from a trusted proxy) and cached keys are unaffected; a key
created through this process works at once even if its id was looked up as unknown before."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiohttp import web
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import AUTH_FAILURES, AUTHENTICATOR, REPOSITORY
from backend.commands.api_keys import new_token
from backend.domain import ApiKey, hash_secret
from backend.http import api_keys
from backend.http.authenticator import ApiKeyAuthenticator
from tests.conftest import bearer, make_settings, mint_token
from tests.support import Client

PROBLEM = "application/problem+json"
FLOODER, OTHER = "203.0.113.7", "198.51.100.9"


async def status_of(client: Client, token: str | None, address: str | None = None) -> tuple[int, dict[str, str]]:
    headers = {**(bearer(token) if token else {}), **({"X-Forwarded-For": address} if address else {})}
    response = await client.get("/v1/api-keys", headers=headers)
    body = await response.json(content_type=None)
    return response.status, {**response.headers, "code": body.get("code", "")}


async def limited_client(aiohttp_client: AiohttpClient, database_url: str, *, burst: int, rate: float,
                         **settings: object) -> Client:
    """A client of an app whose failed authentications are limited to `burst`, then `rate` per second
    (answered at once: no hold)."""
    app = create_app(make_settings(database_url, auth_failure_burst=burst, auth_failure_rate_per_s=rate,
                                   auth_failure_hold_s=0, **settings))
    return await aiohttp_client(app)


def forbid_lookups(app: web.Application) -> None:
    """From now on a key lookup fails the test (the repository is the only way to the keys)."""

    async def no_database(*args: object, **kwargs: object) -> None:
        raise AssertionError("authentication went to the database")

    app[REPOSITORY].find = no_database  # type: ignore[method-assign]


async def test_an_unknown_key_id_costs_one_lookup_then_none(client: Client) -> None:
    app = client.app
    authenticator = app[AUTHENTICATOR]
    _, unknown = new_token()
    before = authenticator.loads
    assert (await status_of(client, unknown))[0] == 401
    assert authenticator.loads == before + 1
    forbid_lookups(app)
    for _ in range(20):
        assert (await status_of(client, unknown))[0] == 401
    assert authenticator.loads == before + 1


async def test_a_flood_of_made_up_keys_from_one_address_is_429_and_costs_no_lookup(
    aiohttp_client: AiohttpClient, database_url: str,
) -> None:
    client = await limited_client(aiohttp_client, database_url, burst=10, rate=0.5, trusted_proxies="127.0.0.1")
    app = client.app
    authenticator = app[AUTHENTICATOR]
    cached = await mint_token(app, "alice", ["wallets:read"])
    assert (await status_of(client, cached, FLOODER))[0] == 403  # now cached (no admin scope: 403)
    uncached = await mint_token(app, "bob", ["wallets:read"])

    before = authenticator.loads
    for _ in range(10):  # the burst: each a lookup and a 401
        assert (await status_of(client, new_token()[1], FLOODER))[0] == 401
    assert authenticator.loads == before + 10
    forbid_lookups(app)
    for token in [new_token()[1] for _ in range(50)] + [None, "garbage", uncached]:
        status, headers = await status_of(client, token, FLOODER)
        assert (status, headers["code"]) == (429, "rate_limited"), token
        assert headers["Content-Type"] == PROBLEM and int(headers["Retry-After"]) >= 1
        # What the client writes left of the proxy's entry is not believed:
        status, _ = await status_of(client, token, f"{OTHER}, {FLOODER}")
        assert status == 429
    assert authenticator.loads == before + 10
    assert app[AUTH_FAILURES].refused >= 100

    assert (await status_of(client, cached, FLOODER))[0] == 403  # a cached key still works from there
    assert (await status_of(client, "garbage", OTHER))[0] == 401  # another address: failures of its own
    assert (await status_of(client, None, OTHER))[0] == 401
    assert (await status_of(client, cached, OTHER))[0] == 403


async def test_concurrent_made_up_keys_cannot_slip_past_the_burst(
    aiohttp_client: AiohttpClient, database_url: str,
) -> None:
    """Each request takes its token before its lookup, not after its failure: 60 at once, 10 lookups."""
    client = await limited_client(aiohttp_client, database_url, burst=10, rate=0.01)
    app = client.app
    before = app[AUTHENTICATOR].loads
    answers = await asyncio.gather(*(status_of(client, new_token()[1]) for _ in range(60)))
    assert sorted(status for status, _ in answers) == [401] * 10 + [429] * 50
    assert app[AUTHENTICATOR].loads == before + 10


async def test_without_trusted_proxies_x_forwarded_for_is_ignored(
    aiohttp_client: AiohttpClient, database_url: str,
) -> None:
    client = await limited_client(aiohttp_client, database_url, burst=3, rate=0.5)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert (await status_of(client, "garbage", address))[0] == 401
    assert (await status_of(client, "garbage", "192.0.2.4"))[0] == 429  # all of them are 127.0.0.1


async def test_a_key_created_here_after_its_id_was_looked_up_unknown_works_at_once(
    client: Client, monkeypatch: object,
) -> None:
    app = client.app
    admin = await mint_token(app, "operator", ["admin"])
    key_id, token = new_token()
    assert (await status_of(client, token))[0] == 401  # remembered as unknown for AUTH_NEGATIVE_TTL_S
    assert app[AUTHENTICATOR].unknown_cached >= 1
    monkeypatch.setattr(api_keys.api_keys, "new_token", lambda: (key_id, token))  # type: ignore[attr-defined]
    created = await client.post("/v1/api-keys", headers=bearer(admin),
                                json={"owner": "carol", "name": "late", "scopes": ["admin"]})
    assert created.status == 201, await created.text()
    assert (await created.json())["key_id"] == str(key_id)
    assert (await status_of(client, token))[0] == 200


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_unknown_key_ids_are_bounded_and_never_push_known_keys_out(client: Client) -> None:
    app = client.app
    authenticator = ApiKeyAuthenticator(app[REPOSITORY], max_entries=10, max_unknown=5)
    token = await mint_token(app, "alice", ["wallets:read"])
    assert await authenticator.authenticate(token) is not None
    for _ in range(50):
        assert await authenticator.authenticate(new_token()[1]) is None
    assert authenticator.unknown_cached == 5
    loads = authenticator.loads
    assert await authenticator.authenticate(token) is not None
    assert authenticator.loads == loads  # still cached after the flood


async def test_a_key_another_process_creates_is_found_once_the_negative_ttl_is_over(client: Client) -> None:
    """No notice of a creation reaches this process: the TTL (AUTH_NEGATIVE_TTL_S) bounds the wait."""
    app = client.app
    clock = Clock()
    authenticator = ApiKeyAuthenticator(app[REPOSITORY], negative_ttl_s=2.0, clock=clock)
    key_id, token = new_token()
    assert await authenticator.authenticate(token) is None
    key = ApiKey.create(key_id, "alice", "elsewhere", ["wallets:read"], hash_secret(token), None, datetime.now(UTC))
    await app[REPOSITORY].save(key)  # as `keys create` or another server process would
    clock.now += 1.9
    assert await authenticator.authenticate(token) is None
    clock.now += 0.2
    actor = await authenticator.authenticate(token)
    assert actor is not None and actor.key_id == str(key_id)
