"""Idempotency-Key over real HTTP, beyond replay and mismatch (test_http_wallets): a repeat while the
first is still running, keys scoped to their API key, Location on a replayed create, retention, and
records kept in the previous release's rendered form."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import orjson
import pytest
from pydantic import ValidationError
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.store import idempotency
from backend.store.append import APPEND_LOCK_KEY
from tests.conftest import bearer, make_settings, mint_token
from tests.integration.http.test_http_wallets import PROBLEM, Api, open_funded
from tests.support import Client, advisory_lock_waiters, eventually


@pytest.fixture
async def admin(client: Client, admin_headers: dict[str, str]) -> Api:
    return Api(client, admin_headers)


async def test_a_repeat_while_the_first_is_running_is_409_in_flight(
    admin: Api, client: Client, pool: asyncpg.Pool
) -> None:
    wid = await open_funded(admin, amount=1000)
    path = f"/v1/wallets/{wid}/debits"
    body = {"amount": 7, "reference": "held"}
    headers = {**admin.headers, "Idempotency-Key": "held-1"}
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("select pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)  # every append waits
        first = asyncio.create_task(client.post(path, json=body, headers=headers))
        await eventually(lambda: advisory_lock_waiters(pool), timeout=5, interval=0.01,
                         what="an append to reach the store's lock")
        async with asyncio.timeout(10):  # a repeat that waited for the first would wait for this lock
            repeat = await client.post(path, json=body, headers=headers)
        assert repeat.status == 409, await repeat.text()
        assert (await repeat.json(content_type=PROBLEM))["code"] == "idempotency_in_flight"
    done = await first
    assert done.status == 200 and "Idempotent-Replayed" not in done.headers
    replayed = await client.post(path, json=body, headers=headers)
    assert replayed.status == 200 and replayed.headers["Idempotent-Replayed"] == "true"
    assert await replayed.read() == await done.read()
    assert (await admin.get(f"/v1/wallets/{wid}"))["balance"] == 993


async def test_keys_are_scoped_to_their_api_key(admin: Api, client: Client) -> None:
    """Two API keys (even of one owner) using the same Idempotency-Key run two commands."""
    scopes = ["wallets:read", "wallets:write"]
    one = bearer(await mint_token(client.app, "alice", scopes))
    two = bearer(await mint_token(client.app, "alice", scopes))
    wid = await open_funded(admin, "alice", 1000)
    path = f"/v1/wallets/{wid}/debits"
    first = await client.post(path, json={"amount": 10, "reference": "a"}, headers={**one, "Idempotency-Key": "same"})
    second = await client.post(path, json={"amount": 20, "reference": "b"}, headers={**two, "Idempotency-Key": "same"})
    assert (first.status, second.status) == (200, 200), await second.text()
    assert "Idempotent-Replayed" not in second.headers
    assert (await second.json())["balance"] == 970
    again = await client.post(path, json={"amount": 20, "reference": "b"}, headers={**two, "Idempotency-Key": "same"})
    assert again.headers["Idempotent-Replayed"] == "true" and await again.read() == await second.read()


@pytest.mark.parametrize(("path", "id_field"), [("/v1/wallets", "wallet_id"), ("/v1/deposits", "deposit_id")])
async def test_a_replayed_create_locates_what_the_first_created(
    admin: Api, client: Client, path: str, id_field: str
) -> None:
    body: dict[str, Any] = {"owner": "alice", "currency": "USD"}
    if path == "/v1/deposits":
        body = {"wallet_id": await open_funded(admin, "alice", 0), "currency": "USD"}
    headers = {**admin.headers, "Idempotency-Key": f"create-{id_field}"}
    first = await client.post(path, json=body, headers=headers)
    again = await client.post(path, json=body, headers=headers)
    assert (first.status, again.status) == (201, 201) and again.headers["Idempotent-Replayed"] == "true"
    created = (await first.json())[id_field]
    assert first.headers["Location"] == again.headers["Location"] == f"{path}/{created}"
    assert (await admin.get(again.headers["Location"]))[id_field] == created


async def test_records_are_kept_for_their_retention_and_never_less_than_a_day(
    aiohttp_client: AiohttpClient, database_url: str, pool: asyncpg.Pool
) -> None:
    with pytest.raises(ValidationError, match="idempotency_retention_h"):
        make_settings(database_url, idempotency_retention_h=23.9)
    settings = make_settings(database_url, housekeeping_interval_s=0.05)
    assert settings.idempotency_retention_h >= 24
    client = await aiohttp_client(create_app(settings))
    admin = bearer(await mint_token(client.app, "root", ["admin"]))
    wid = await open_funded(Api(client, admin), amount=100)
    kept, purged = f"kept-{uuid.uuid4()}", f"purged-{uuid.uuid4()}"
    for key in (kept, purged):
        reply = await client.post(f"/v1/wallets/{wid}/debits", json={"amount": 1, "reference": key},
                                  headers={**admin, "Idempotency-Key": key})
        assert reply.status == 200
    age = {kept: settings.idempotency_retention_h - 0.1, purged: settings.idempotency_retention_h + 0.1}
    for key, hours in age.items():
        await pool.execute("update idempotency_keys set created_at = now() - make_interval(secs => $1) "
                           "where key = $2", hours * 3600, key)
    scope = await pool.fetchval("select scope from idempotency_keys where key = $1", kept)
    async def was_purged() -> bool:
        return await idempotency.lookup(pool, scope, purged) is None

    await eventually(was_purged, timeout=4, what="the app's own housekeeping (every 50 ms here) to purge the key")
    assert await idempotency.lookup(pool, scope, purged) is None
    assert await idempotency.lookup(pool, scope, kept) is not None


@pytest.mark.parametrize("amount", [7, 1000], ids=["answer", "refusal"])
async def test_a_record_kept_in_the_previous_rendered_form_replays_the_same_bytes(
    admin: Api, client: Client, pool: asyncpg.Pool, amount: int
) -> None:
    """Before migration 0008 a record held the first answer's status, bytes and content type; such a
    record (converted by 0008, or written by a process of that release during an upgrade) replays them."""
    wid = await open_funded(admin, amount=100)
    path, body = f"/v1/wallets/{wid}/debits", {"amount": amount, "reference": "old"}
    key, old_key = f"new-{uuid.uuid4()}", f"old-{uuid.uuid4()}"
    first = await client.post(path, json=body, headers={**admin.headers, "Idempotency-Key": key})
    answer = await first.read()
    row = await pool.fetchrow("select scope, fingerprint, position from idempotency_keys where key = $1", key)
    assert row is not None
    scope, fingerprint, position = row
    old_row = [scope, old_key, fingerprint.hex(), first.status, answer.hex(), first.content_type, position]
    await pool.execute("select tally_insert_appended('[]'::jsonb, $1::text::jsonb)", orjson.dumps([old_row]).decode())
    replayed = await client.post(path, json=body, headers={**admin.headers, "Idempotency-Key": old_key})
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert (replayed.status, replayed.content_type, await replayed.read()) == (first.status, first.content_type, answer)
    assert replayed.headers.get("X-Position") == first.headers.get("X-Position")
