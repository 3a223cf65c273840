"""Wallet endpoints over real HTTP: every command, its errors, idempotency, If-Match, authorization."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import COMMANDS, STORE
from backend.clock import ManualClock
from backend.config import Settings
from backend.domain import Wallet
from backend.store.append import APPEND_LOCK_KEY
from backend.store.event_store import EventStore
from backend.store.repository import Repository
from tests.conftest import bearer, mint_token
from tests.support import Client, eventually, object_of

PROBLEM = "application/problem+json"


class Api:
    def __init__(self, client: Client, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers

    async def post(self, path: str, body: Any = None, *, status: int, **headers: str) -> dict[str, Any]:
        response = await self.client.post(path, json=body if body is not None else {},
                                          headers={**self.headers, **headers})
        text = await response.text()
        assert response.status == status, text
        return await object_of(response)

    async def get(self, path: str, *, status: int = 200) -> dict[str, Any]:
        """Reads come from the read models: ask for everything written so far (read-your-writes)."""
        head = await self.client.app[STORE].head()
        response = await self.client.get(path, headers={**self.headers, "X-Min-Position": str(head)})
        assert response.status == status, await response.text()
        return await object_of(response)


@pytest.fixture
async def admin(client: Client, admin_headers: dict[str, str]) -> Api:
    return Api(client, admin_headers)


async def open_funded(api: Api, owner: str = "alice", amount: int = 1000, currency: str = "USD") -> str:
    wallet = await api.post("/v1/wallets", {"owner": owner, "currency": currency}, status=201)
    if amount:
        path = f"/v1/wallets/{wallet['wallet_id']}/credits"
        await api.post(path, {"amount": amount, "reference": "seed"}, status=200)
    return str(wallet["wallet_id"])


async def test_open_credit_debit_and_read(admin: Api) -> None:
    opened = await admin.post("/v1/wallets", {"owner": "alice", "currency": "USD"}, status=201)
    assert opened["balance"] == opened["available"] == 0
    assert opened["version"] == 1 and opened["position"] > 0
    wid = opened["wallet_id"]
    credited = await admin.post(f"/v1/wallets/{wid}/credits", {"amount": 500, "reference": "top-up"}, status=200)
    assert (credited["balance"], credited["version"]) == (500, 2)
    assert credited["position"] > opened["position"]
    debited = await admin.post(f"/v1/wallets/{wid}/debits", {"amount": 120, "reference": "order-1"}, status=200)
    assert (debited["balance"], debited["available"]) == (380, 380)
    read = await admin.get(f"/v1/wallets/{wid}")
    fields = {"wallet_id", "owner", "currency", "balance", "available", "locked", "reserved", "version"}
    assert {k: read[k] for k in fields} == {k: debited[k] for k in fields}
    assert set(read) == fields | {"locks", "reservations"} and read["locks"] == read["reservations"] == []


async def test_locks_release_and_settle(admin: Api) -> None:
    payer = await open_funded(admin, "alice", 1000)
    payee = await open_funded(admin, "bob", 0)
    locked = await admin.post(f"/v1/wallets/{payer}/locks", {"amount": 300, "reason": "escrow"}, status=201)
    assert (locked["locked"], locked["available"], locked["balance"]) == (300, 700, 1000)
    second = await admin.post(f"/v1/wallets/{payer}/locks", {"amount": 100, "reason": "escrow 2"}, status=201)
    released = await admin.post(f"/v1/wallets/{payer}/locks/{second['lock_id']}/release", status=200)
    assert (released["locked"], released["available"]) == (300, 700)
    settled = await admin.post(f"/v1/wallets/{payer}/locks/{locked['lock_id']}/settle",
                               {"to_wallet_id": payee}, status=200)
    assert (settled["balance"], settled["locked"]) == (700, 0)
    assert settled["to_wallet_id"] == payee and "to_wallet" not in settled
    again = await admin.post(f"/v1/wallets/{payer}/locks/{locked['lock_id']}/release", status=409)
    assert again["code"] == "lock_not_open"
    assert (await admin.get(f"/v1/wallets/{payee}"))["balance"] == 300


async def test_reservations_confirm_partial_and_rollback(admin: Api) -> None:
    wid = await open_funded(admin, amount=1000)
    reserved = await admin.post(f"/v1/wallets/{wid}/reservations", {"amount": 400, "ttl_seconds": 60}, status=201)
    assert (reserved["reserved"], reserved["available"]) == (400, 600)
    assert reserved["expires_at"]
    confirmed = await admin.post(f"/v1/wallets/{wid}/reservations/{reserved['reservation_id']}/confirm",
                                 {"amount": 250}, status=200)
    assert (confirmed["balance"], confirmed["reserved"], confirmed["available"]) == (750, 0, 750)
    too_much = await admin.post(f"/v1/wallets/{wid}/reservations", {"amount": 100, "ttl_seconds": 60}, status=201)
    over = await admin.post(f"/v1/wallets/{wid}/reservations/{too_much['reservation_id']}/confirm",
                            {"amount": 101}, status=422)
    assert over["code"] == "amount_exceeds_reserved"
    rolled = await admin.post(f"/v1/wallets/{wid}/reservations/{too_much['reservation_id']}/rollback", status=200)
    assert (rolled["reserved"], rolled["available"]) == (0, 750)
    closed = await admin.post(f"/v1/wallets/{wid}/reservations/{too_much['reservation_id']}/rollback", status=409)
    assert closed["code"] == "reservation_not_open"


async def test_a_reservation_past_its_expiry_is_409_expired_to_confirm_and_rollback(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    """Whether or not the expiry process has recorded it yet: the answer is the same. The app's clock is
    moved to the deadline (no waiting)."""
    clock = ManualClock()
    client = await aiohttp_client(create_app(settings, clock))
    admin = Api(client, bearer(await mint_token(client.app, "operator", ["admin"])))
    wid = await open_funded(admin, amount=1000)
    reserved = await admin.post(f"/v1/wallets/{wid}/reservations", {"amount": 400, "ttl_seconds": 1}, status=201)
    assert datetime.fromisoformat(reserved["expires_at"]) == clock.now() + timedelta(seconds=1)
    clock.advance(1)
    for action, body in (("confirm", {"amount": 400}), ("rollback", {})):
        late = await admin.post(f"/v1/wallets/{wid}/reservations/{reserved['reservation_id']}/{action}", body,
                                status=409)
        assert late["code"] == "reservation_expired", late
    read = await admin.get(f"/v1/wallets/{wid}")
    assert (read["balance"], read["reserved"], read["available"]) == (1000, 0, 1000)


async def test_a_copy_taken_before_a_reservation_fell_due_is_not_current(
    aiohttp_client: AiohttpClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    """The wallet's figures change at the deadline, before the expiry process records anything (its
    append is held back here): If-None-Match with the version read before gets the new figures, not a
    304 that says the copy showing the money reserved is still current."""
    clock = ManualClock()
    client = await aiohttp_client(create_app(settings, clock))
    admin = Api(client, bearer(await mint_token(client.app, "operator", ["admin"])))
    wid = await open_funded(admin, amount=1000)
    await admin.post(f"/v1/wallets/{wid}/reservations", {"amount": 400, "ttl_seconds": 60}, status=201)
    head = await client.app[STORE].head()
    before = await client.get(f"/v1/wallets/{wid}", headers={**admin.headers, "X-Min-Position": str(head)})
    assert (await before.json())["available"] == 600
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("select pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        clock.advance(60)
        copy = {**admin.headers, "If-None-Match": before.headers["ETag"]}
        again = await client.get(f"/v1/wallets/{wid}", headers=copy)
        assert again.status == 200
        assert ((await again.json())["available"], again.headers["ETag"]) == (1000, before.headers["ETag"])
        assert await client.app[STORE].head() == head  # nothing recorded: the clock alone moved the figures

    async def recorded() -> bool:
        return bool((await admin.get(f"/v1/wallets/{wid}"))["version"] == 4)

    await eventually(recorded, what="the expiry to be recorded once appends go on")


async def test_giving_up_under_contention_is_409_wrong_expected_version_and_changes_nothing(
    admin: Api, client: Client, pool: asyncpg.Pool
) -> None:
    """Another process appends between this one's load and its append; with one attempt allowed, the
    command gives up instead of retrying on fresh state."""
    wid = await open_funded(admin, amount=1000)
    other = EventStore(pool)
    try:
        repository = Repository(other)
        wallet = await repository.get(Wallet, uuid.UUID(wid))
        wallet.credit(5, "from another process", datetime.now(UTC))
        await repository.save(wallet)
    finally:
        await other.close()
    bus = client.app[COMMANDS]
    bus.max_attempts = 1
    try:
        gave_up = await admin.post(f"/v1/wallets/{wid}/debits", {"amount": 1, "reference": "x"}, status=409)
    finally:
        bus.max_attempts = 25
    assert gave_up["code"] == "wrong_expected_version"
    assert (await admin.get(f"/v1/wallets/{wid}"))["balance"] == 1005
    retried = await admin.post(f"/v1/wallets/{wid}/debits", {"amount": 1, "reference": "x"}, status=200)
    assert retried["balance"] == 1004


async def test_domain_errors_have_stable_codes(admin: Api) -> None:
    wid = await open_funded(admin, amount=100)
    short = await admin.post(f"/v1/wallets/{wid}/debits", {"amount": 101, "reference": "x"}, status=422)
    assert short["code"] == "insufficient_funds"
    eur = await open_funded(admin, "alice", 0, currency="EUR")
    lock = await admin.post(f"/v1/wallets/{wid}/locks", {"amount": 10, "reason": "r"}, status=201)
    mismatch = await admin.post(f"/v1/wallets/{wid}/locks/{lock['lock_id']}/settle", {"to_wallet_id": eur}, status=422)
    assert mismatch["code"] == "currency_mismatch"
    same = await admin.post(f"/v1/wallets/{wid}/locks/{lock['lock_id']}/settle", {"to_wallet_id": wid}, status=422)
    assert same["code"] == "same_wallet"
    missing = await admin.post(f"/v1/wallets/{uuid.uuid4()}/debits", {"amount": 1, "reference": "x"}, status=404)
    assert missing["code"] == "not_found"
    assert (await admin.get(f"/v1/wallets/{wid}"))["balance"] == 100


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount": 1.5, "reference": "x"}, "amount"),
        ({"amount": -5, "reference": "x"}, "amount"),
        ({"amount": 0, "reference": "x"}, "amount"),
        ({"amount": "10", "reference": "x"}, "amount"),
        ({"amount": 2**63, "reference": "x"}, "amount"),
        ({"amount": True, "reference": "x"}, "amount"),
        ({"amount": 5, "reference": "x", "extra": 1}, "extra"),
        ({"amount": 5}, "reference"),
    ],
)
async def test_bad_amounts_are_422_naming_the_field_and_change_nothing(
    admin: Api, body: dict[str, Any], field: str
) -> None:
    wid = await open_funded(admin, amount=100)
    problem = await admin.post(f"/v1/wallets/{wid}/debits", body, status=422)
    assert problem["code"] == "validation_error"
    assert field in {e["field"] for e in problem["errors"]}
    wallet = await admin.get(f"/v1/wallets/{wid}")
    assert (wallet["balance"], wallet["version"]) == (100, 2)


async def test_unsupported_currency_is_a_validation_error(admin: Api) -> None:
    problem = await admin.post("/v1/wallets", {"owner": "a", "currency": "XXX"}, status=422)
    assert problem["code"] == "validation_error"


async def test_idempotency_replay_mismatch_and_in_flight(admin: Api, client: Client) -> None:
    wid = await open_funded(admin, amount=1000)
    path = f"/v1/wallets/{wid}/debits"
    body = {"amount": 100, "reference": "order-9"}
    first = await client.post(path, json=body, headers={**admin.headers, "Idempotency-Key": "k-1"})
    assert first.status == 200
    again = await client.post(path, json=body, headers={**admin.headers, "Idempotency-Key": "k-1"})
    assert again.status == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == await first.read()
    assert (await admin.get(f"/v1/wallets/{wid}"))["balance"] == 900
    other = await client.post(path, json={**body, "amount": 5}, headers={**admin.headers, "Idempotency-Key": "k-1"})
    assert other.status == 422
    assert (await other.json(content_type=PROBLEM))["code"] == "idempotency_conflict"

    # a domain rejection is an outcome too: replayed, even once funds would allow it
    short = {"amount": 5000, "reference": "big"}
    rejected = await client.post(path, json=short, headers={**admin.headers, "Idempotency-Key": "k-2"})
    assert rejected.status == 422
    await admin.post(f"/v1/wallets/{wid}/credits", {"amount": 10_000, "reference": "more"}, status=200)
    replayed = await client.post(path, json=short, headers={**admin.headers, "Idempotency-Key": "k-2"})
    assert replayed.status == 422 and replayed.headers["Idempotent-Replayed"] == "true"
    assert await replayed.read() == await rejected.read()

    # concurrent repeats: one runs, the others are told it is in flight or get its replay
    results = await asyncio.gather(*(
        client.post(path, json={"amount": 1, "reference": "c"}, headers={**admin.headers, "Idempotency-Key": "k-3"})
        for _ in range(10)
    ))
    statuses = sorted(r.status for r in results)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 409}
    assert (await admin.get(f"/v1/wallets/{wid}"))["balance"] == 900 + 10_000 - 1


async def test_if_match_makes_commands_conditional(admin: Api) -> None:
    wid = await open_funded(admin, amount=100)  # version 2
    one = {"amount": 1, "reference": "x"}
    stale = await admin.post(f"/v1/wallets/{wid}/debits", one, status=412, **{"If-Match": '"1"'})
    assert stale["code"] == "precondition_failed"
    ok = await admin.post(f"/v1/wallets/{wid}/debits", one, status=200, **{"If-Match": '"2"'})
    assert ok["version"] == 3


async def test_authentication_and_authorization_across_owners(client: Client, admin: Api) -> None:
    app = client.app
    alice = Api(client, bearer(await mint_token(app, "alice", ["wallets:read", "wallets:write"])))
    bob = Api(client, bearer(await mint_token(app, "bob", ["wallets:read", "wallets:write"])))
    reader = Api(client, bearer(await mint_token(app, "alice", ["wallets:read"])))
    mine = await alice.post("/v1/wallets", {"owner": "alice", "currency": "USD"}, status=201)
    wid = mine["wallet_id"]
    await admin.post(f"/v1/wallets/{wid}/credits", {"amount": 50, "reference": "x"}, status=200)

    one = {"amount": 1, "reference": "x"}
    assert (await bob.get(f"/v1/wallets/{wid}", status=403))["code"] == "forbidden"
    assert (await bob.post(f"/v1/wallets/{wid}/debits", one, status=403))["code"] == "forbidden"
    assert (await bob.post("/v1/wallets", {"owner": "alice", "currency": "USD"}, status=403))["code"] == "forbidden"
    assert (await reader.post(f"/v1/wallets/{wid}/debits", one, status=403))["code"] == "forbidden"
    assert (await alice.post(f"/v1/wallets/{wid}/credits", one, status=403))["code"] == "forbidden"
    await alice.post(f"/v1/wallets/{wid}/debits", one, status=200)

    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                    bearer("tly_" + "0" * 32 + "_" + "x" * 43)):
        response = await client.get(f"/v1/wallets/{wid}", headers=headers)
        assert response.status == 401
        assert (await response.json(content_type=PROBLEM))["code"] == "unauthorized"


async def test_a_settle_answers_with_the_payers_wallet_only(client: Client, admin: Api) -> None:
    """Owner B pays a lock into A's wallet: B learns A's wallet id (it named it), not A's figures; a key
    of A's owner reads them with GET as usual."""
    app = client.app
    alice = Api(client, bearer(await mint_token(app, "alice", ["wallets:read", "wallets:write"])))
    bob = Api(client, bearer(await mint_token(app, "bob", ["wallets:read", "wallets:write"])))
    payee = await open_funded(admin, "alice", 5000)
    payer = await open_funded(admin, "bob", 10)
    locked = await bob.post(f"/v1/wallets/{payer}/locks", {"amount": 1, "reason": "probe"}, status=201)
    settled = await bob.post(f"/v1/wallets/{payer}/locks/{locked['lock_id']}/settle",
                             {"to_wallet_id": payee}, status=200)
    assert set(settled) == {"wallet_id", "owner", "currency", "balance", "available", "locked", "reserved",
                            "version", "position", "lock_id", "to_wallet_id"}
    assert (settled["wallet_id"], settled["owner"], settled["balance"]) == (payer, "bob", 9)
    assert settled["to_wallet_id"] == payee
    assert "5001" not in str(settled)
    assert (await bob.get(f"/v1/wallets/{payee}", status=403))["code"] == "forbidden"
    assert (await alice.get(f"/v1/wallets/{payee}"))["balance"] == 5001


async def test_replay_wins_over_a_precondition_that_no_longer_holds(admin: Api, client: Client) -> None:
    wid = await open_funded(admin, amount=100)  # version 2
    headers = {**admin.headers, "Idempotency-Key": "cond-1", "If-Match": '"2"'}
    body = {"amount": 10, "reference": "x"}
    first = await client.post(f"/v1/wallets/{wid}/debits", json=body, headers=headers)
    assert first.status == 200
    again = await client.post(f"/v1/wallets/{wid}/debits", json=body, headers=headers)  # wallet is at 3 now
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == await first.read()
