"""Deposit endpoints over real HTTP and the real store: addresses, transitions, crediting exactly once
(also under concurrent and cross-process confirmations), one credit per chain transaction, authz."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import pytest

from backend.app import create_app
from backend.appkeys import STORE
from backend.commands.deposits import chain_tx_stream
from backend.config import Settings
from backend.domain import derive_address
from backend.domain.registry import CHAIN_TX_CLAIMED
from tests.conftest import bearer, mint_token
from tests.integration.http.test_http_wallets import Api, open_funded
from tests.support import Client

ADDRESS = {
    "BTC": re.compile(r"tb1q[qpzry9x8gf2tvdw0s3jn54khce6mua7l]{38}"),
    "ETH": re.compile(r"0x[0-9a-f]{40}"),
    "USDT": re.compile(r"0x[0-9a-f]{40}"),
    "USD": re.compile(r"TLY\d{20}"),
    "JPY": re.compile(r"TLY\d{20}"),
}
DEPOSIT_FIELDS = {"deposit_id", "wallet_id", "currency", "address", "status", "confirmations", "amount",
                  "chain_tx_id", "failure_reason", "version"}


@pytest.fixture
async def admin(client: Client, admin_headers: dict[str, str]) -> Api:
    return Api(client, admin_headers)


@pytest.fixture
async def alice(client: Client) -> Api:
    """The wallet owner: may open deposits on and read her own wallets."""
    return Api(client, bearer(await mint_token(client.app, "alice", ["deposits:write", "wallets:read"])))


@pytest.fixture
async def watcher(client: Client) -> Api:
    """The chain watcher: reports deposit statuses for every wallet."""
    return Api(client, bearer(await mint_token(client.app, "watcher", ["deposits:admin"])))


async def open_deposit(api: Api, wallet_id: str, currency: str = "USD") -> dict[str, Any]:
    return await api.post("/v1/deposits", {"wallet_id": wallet_id, "currency": currency}, status=201)


async def report(api: Api, deposit_id: str, status_code: int = 200, **body: Any) -> dict[str, Any]:
    return await api.post(f"/v1/deposits/{deposit_id}/status", body, status=status_code)


async def confirming(admin: Api, alice: Api, watcher: Api, currency: str = "USD", owner: str = "alice") -> str:
    """A deposit on a fresh wallet, moved to confirming; returns the deposit id."""
    wallet_id = await open_funded(admin, owner, 0, currency=currency)
    deposit = await open_deposit(admin if owner != "alice" else alice, wallet_id, currency)
    await report(watcher, deposit["deposit_id"], status="confirming", confirmations=1)
    return str(deposit["deposit_id"])


async def credits_of(client: Client, deposit_id: str) -> list[dict[str, Any]]:
    """Every DepositCredited event of the whole log that credits this deposit."""
    store = client.app[STORE]
    events = [e async for e in store.iter_all(types=["DepositCredited"])]
    return [e.data for e in events if e.data["deposit_id"] == deposit_id]


# ---------------------------------------------------------------- opening


@pytest.mark.parametrize("currency", sorted(ADDRESS))
async def test_open_deposit_derives_a_per_currency_address(
    admin: Api, alice: Api, settings: Settings, currency: str
) -> None:
    wallet_id = await open_funded(admin, "alice", 0, currency=currency)
    response = await alice.client.post("/v1/deposits", json={"wallet_id": wallet_id, "currency": currency},
                                       headers=alice.headers)
    assert response.status == 201, await response.text()
    deposit = await response.json()
    assert response.headers["Location"] == f"/v1/deposits/{deposit['deposit_id']}"
    assert DEPOSIT_FIELDS | {"position", "wallet"} == set(deposit)
    assert deposit["wallet_id"] == wallet_id and deposit["currency"] == currency
    assert (deposit["status"], deposit["confirmations"], deposit["amount"]) == ("pending", 0, None)
    assert deposit["version"] == 1 and deposit["position"] > 0
    assert ADDRESS[currency].fullmatch(deposit["address"]), deposit["address"]
    secret = settings.deposit_address_secret.get_secret_value().encode()
    assert deposit["address"] == derive_address(uuid.UUID(deposit["deposit_id"]), currency, secret)
    if currency in ("USD", "JPY"):
        digits = deposit["address"][5:] + "292134" + deposit["address"][3:5]
        assert int(digits) % 97 == 1


async def test_addresses_are_deterministic_and_unique(admin: Api, alice: Api, settings: Settings) -> None:
    wallet_id = await open_funded(admin, "alice", 0, currency="BTC")
    created = await asyncio.gather(*(open_deposit(alice, wallet_id, "BTC") for _ in range(20)))
    assert len({d["address"] for d in created}) == 20
    assert len({d["deposit_id"] for d in created}) == 20
    secret = settings.deposit_address_secret.get_secret_value().encode()
    for deposit in created:
        read = await alice.get(f"/v1/deposits/{deposit['deposit_id']}")
        assert read["address"] == deposit["address"]
        assert derive_address(uuid.UUID(deposit["deposit_id"]), "BTC", secret) == deposit["address"]
    other = derive_address(uuid.UUID(created[0]["deposit_id"]), "BTC", b"another secret entirely")
    assert other != created[0]["address"]


async def test_currency_mismatch_unknown_wallet_and_unsupported_currency(admin: Api, alice: Api) -> None:
    wallet_id = await open_funded(admin, "alice", 0, currency="USD")
    mismatch = await alice.post("/v1/deposits", {"wallet_id": wallet_id, "currency": "EUR"}, status=422)
    assert mismatch["code"] == "currency_mismatch"
    unsupported = await alice.post("/v1/deposits", {"wallet_id": wallet_id, "currency": "XXX"}, status=422)
    assert unsupported["code"] == "validation_error"
    missing = await alice.post("/v1/deposits", {"wallet_id": str(uuid.uuid4()), "currency": "USD"}, status=404)
    assert missing["code"] == "not_found"
    bad_id = await alice.post("/v1/deposits", {"wallet_id": "not-a-uuid", "currency": "USD"}, status=422)
    assert "wallet_id" in {e["field"] for e in bad_id["errors"]}


# ---------------------------------------------------------------- transitions


async def test_transitions_through_confirmed_credit_the_wallet(admin: Api, alice: Api, watcher: Api) -> None:
    wallet_id = await open_funded(admin, "alice", 100)
    deposit = await open_deposit(alice, wallet_id)
    did = deposit["deposit_id"]
    step = await report(watcher, did, status="confirming", confirmations=1)
    assert (step["status"], step["confirmations"], step["version"]) == ("confirming", 1, 2)
    assert step["position"] > deposit["position"]
    step = await report(watcher, did, status="pending", confirmations=0)
    assert (step["status"], step["version"]) == ("pending", 3)
    await report(watcher, did, status="confirming", confirmations=2)
    done = await report(watcher, did, status="confirmed", confirmations=6, amount=2500, chain_tx_id="tx-1")
    assert (done["status"], done["amount"], done["chain_tx_id"]) == ("confirmed", 2500, "tx-1")
    assert done["confirmations"] == 6
    assert (done["wallet"]["balance"], done["wallet"]["available"]) == (2600, 2600)
    assert (await alice.get(f"/v1/deposits/{did}")) == {k: done[k] for k in DEPOSIT_FIELDS}
    assert (await admin.get(f"/v1/wallets/{wallet_id}"))["balance"] == 2600
    for status in ("pending", "confirming", "failed", "expired"):
        refused = await report(watcher, did, 409, status=status)
        assert (refused["code"], refused["state"], refused["action"]) == ("invalid_transition", "confirmed", status)
    again = await report(watcher, did, 409, status="confirmed", amount=2500, chain_tx_id="tx-1")
    assert again["code"] == "invalid_transition"
    assert (await admin.get(f"/v1/wallets/{wallet_id}"))["balance"] == 2600
    assert len(await credits_of(alice.client, did)) == 1


async def test_failed_and_expired_are_terminal_and_credit_nothing(admin: Api, alice: Api, watcher: Api) -> None:
    wallet_id = await open_funded(admin, "alice", 0)
    failed = await open_deposit(alice, wallet_id)
    await report(watcher, failed["deposit_id"], status="confirming", confirmations=1)
    step = await report(watcher, failed["deposit_id"], status="failed", reason="double spend")
    assert (step["status"], step["failure_reason"]) == ("failed", "double spend")
    refused = await report(watcher, failed["deposit_id"], 409, status="confirmed", amount=5, chain_tx_id="t")
    assert refused["code"] == "invalid_transition"

    expired = await open_deposit(alice, wallet_id)
    skip = await report(watcher, expired["deposit_id"], 409, status="confirmed", amount=5, chain_tx_id="t")
    assert (skip["code"], skip["state"]) == ("invalid_transition", "pending")
    assert (await report(watcher, expired["deposit_id"], status="expired"))["status"] == "expired"
    await report(watcher, expired["deposit_id"], 409, status="confirming", confirmations=1)
    assert (await admin.get(f"/v1/wallets/{wallet_id}"))["balance"] == 0
    assert (await alice.get(f"/v1/deposits/{expired['deposit_id']}"))["version"] == 2


async def test_idempotent_confirmation_replays_and_credits_once(
    admin: Api, alice: Api, watcher: Api, client: Client
) -> None:
    did = await confirming(admin, alice, watcher)
    body = {"status": "confirmed", "amount": 700, "chain_tx_id": "tx-idem", "confirmations": 3}
    headers = {**watcher.headers, "Idempotency-Key": "confirm-1"}
    first = await client.post(f"/v1/deposits/{did}/status", json=body, headers=headers)
    assert first.status == 200, await first.text()
    again = await client.post(f"/v1/deposits/{did}/status", json=body, headers=headers)
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == await first.read()
    assert len(await credits_of(client, did)) == 1
    other = await client.post(f"/v1/deposits/{did}/status", json={**body, "amount": 701}, headers=headers)
    assert (other.status, (await other.json())["code"]) == (422, "idempotency_conflict")


async def test_if_match_makes_a_status_change_conditional(admin: Api, alice: Api, watcher: Api) -> None:
    did = await confirming(admin, alice, watcher)
    stale = await watcher.post(f"/v1/deposits/{did}/status", {"status": "pending"}, status=412, **{"If-Match": '"1"'})
    assert stale["code"] == "precondition_failed"
    fresh = await watcher.post(f"/v1/deposits/{did}/status", {"status": "pending"}, status=200, **{"If-Match": '"2"'})
    assert fresh["version"] == 3


# ---------------------------------------------------------------- exactly once under concurrency


async def test_20_concurrent_confirmations_credit_once(
    admin: Api, alice: Api, watcher: Api, client: Client
) -> None:
    did = await confirming(admin, alice, watcher)
    deposit = await alice.get(f"/v1/deposits/{did}")
    body = {"status": "confirmed", "amount": 1234, "chain_tx_id": "tx-race", "confirmations": 6}
    responses = await asyncio.gather(*(
        client.post(f"/v1/deposits/{did}/status", json=body, headers=watcher.headers) for _ in range(20)
    ))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] + [409] * 19
    codes = {(await r.json(content_type=None))["code"] for r in responses if r.status == 409}
    assert codes == {"invalid_transition"}
    assert (await admin.get(f"/v1/wallets/{deposit['wallet_id']}"))["balance"] == 1234
    assert [c["amount"] for c in await credits_of(client, did)] == [1234]


async def test_confirmations_racing_across_two_processes_credit_once(  # type: ignore[no-untyped-def]
    aiohttp_client, settings: Settings, admin: Api, alice: Api, watcher: Api, client: Client
) -> None:
    """Two app instances share the database but not their in-process stream locks: the store's
    expected-version check and the bus's retry decide."""
    other = await aiohttp_client(create_app(settings))
    did = await confirming(admin, alice, watcher)
    body = {"status": "confirmed", "amount": 50, "chain_tx_id": "tx-2proc"}
    clients = [client, other]
    responses = await asyncio.gather(*(
        clients[i % 2].post(f"/v1/deposits/{did}/status", json=body, headers=watcher.headers) for i in range(20)
    ))
    assert sorted(r.status for r in responses) == [200] + [409] * 19
    assert len(await credits_of(client, did)) == 1


# ---------------------------------------------------------------- one credit per chain transaction


async def test_a_chain_tx_credits_only_one_deposit(admin: Api, alice: Api, watcher: Api, client: Client) -> None:
    first, second = await confirming(admin, alice, watcher), await confirming(admin, alice, watcher)
    await report(watcher, first, status="confirmed", amount=10, chain_tx_id="0xABCdef")
    for variant in ("0xABCdef", "0xabcdef", " 0XABCDEF "):
        refused = await report(watcher, second, 409, status="confirmed", amount=10, chain_tx_id=variant)
        assert (refused["code"], refused["reason"]) == ("invalid_transition", "chain_tx_already_credited")
        assert refused["credited_deposit_id"] == first
    unchanged = await alice.get(f"/v1/deposits/{second}")
    assert (unchanged["status"], unchanged["version"]) == ("confirming", 2)
    assert await credits_of(client, second) == []
    # The pair is (currency, chain tx id): the same id on another currency is another transaction.
    eur = await confirming(admin, alice, watcher, currency="EUR")
    assert (await report(watcher, eur, status="confirmed", amount=10, chain_tx_id="0xABCdef"))["status"] == "confirmed"


async def test_one_chain_tx_raced_onto_many_deposits_credits_one(  # type: ignore[no-untyped-def]
    aiohttp_client, settings: Settings, admin: Api, alice: Api, watcher: Api, client: Client
) -> None:
    other = await aiohttp_client(create_app(settings))
    dids = [await confirming(admin, alice, watcher, owner=f"owner-{i % 3}") for i in range(10)]
    body = {"status": "confirmed", "amount": 99, "chain_tx_id": "tx-shared"}
    clients = [client, other]
    responses = await asyncio.gather(*(
        clients[i % 2].post(f"/v1/deposits/{did}/status", json=body, headers=watcher.headers)
        for i, did in enumerate(dids)
    ))
    assert sorted(r.status for r in responses) == [200] + [409] * 9
    problems = [await r.json(content_type=None) for r in responses if r.status == 409]
    assert {p["reason"] for p in problems} == {"chain_tx_already_credited"}
    credited = [did for did in dids if await credits_of(client, did)]
    assert len(credited) == 1
    assert {p["credited_deposit_id"] for p in problems} == set(credited)
    claims = await client.app[STORE].read_stream(chain_tx_stream("USD", "tx-shared"))
    assert [(e.type, e.data["deposit_id"]) for e in claims] == [(CHAIN_TX_CLAIMED, credited[0])]


# ---------------------------------------------------------------- authorization


async def test_authorization(admin: Api, alice: Api, watcher: Api, client: Client) -> None:
    app = client.app
    wallet_id = await open_funded(admin, "alice", 0)
    bob = Api(client, bearer(await mint_token(app, "bob", ["deposits:write", "wallets:read", "wallets:write"])))
    reader = Api(client, bearer(await mint_token(app, "alice", ["wallets:read"])))

    other_owner = await bob.post("/v1/deposits", {"wallet_id": wallet_id, "currency": "USD"}, status=403)
    assert other_owner["code"] == "forbidden"
    no_scope = await reader.post("/v1/deposits", {"wallet_id": wallet_id, "currency": "USD"}, status=403)
    assert no_scope["code"] == "forbidden"

    deposit = await open_deposit(alice, wallet_id)
    path = f"/v1/deposits/{deposit['deposit_id']}"
    assert (await bob.get(path, status=403))["code"] == "forbidden"
    assert (await watcher.get(path, status=403))["code"] == "forbidden"  # no wallets:read
    assert (await reader.get(path))["deposit_id"] == deposit["deposit_id"]
    assert (await admin.get(path))["deposit_id"] == deposit["deposit_id"]

    for caller in (alice, bob, reader):
        refused = await caller.post(f"{path}/status", {"status": "confirming"}, status=403)
        assert refused["code"] == "forbidden"
    assert (await admin.post(f"{path}/status", {"status": "confirming"}, status=200))["status"] == "confirming"

    unauthenticated = await client.get(path)
    assert unauthenticated.status == 401
    assert (await watcher.post(f"/v1/deposits/{uuid.uuid4()}/status", {"status": "expired"}, status=404))[
        "code"] == "not_found"
    assert (await alice.get(f"/v1/deposits/{uuid.uuid4()}", status=404))["code"] == "not_found"
    assert (await alice.get("/v1/deposits/not-a-uuid", status=404))["code"] == "not_found"


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "confirmed", "amount": 1.5, "chain_tx_id": "t"}, "amount"),
        ({"status": "confirmed", "amount": "10", "chain_tx_id": "t"}, "amount"),
        ({"status": "confirmed", "amount": 0, "chain_tx_id": "t"}, "amount"),
        ({"status": "confirmed", "amount": -3, "chain_tx_id": "t"}, "amount"),
        ({"status": "confirmed", "amount": 2**63, "chain_tx_id": "t"}, "amount"),
        ({"status": "confirmed", "chain_tx_id": "t"}, "amount"),
        ({"status": "confirmed", "amount": 10}, "chain_tx_id"),
        ({"status": "confirmed", "amount": 10, "chain_tx_id": ""}, "chain_tx_id"),
        ({"status": "confirming", "confirmations": -1}, "confirmations"),
        ({"status": "confirming", "confirmations": 1.0}, "confirmations"),
        ({"status": "settled"}, "status"),
        ({"confirmations": 1}, "status"),
        ({"status": "pending", "amount": 10}, "amount"),
        ({"status": "confirming", "reason": "why"}, "reason"),
        ({"status": "confirming", "colour": "blue"}, "colour"),
    ],
)
async def test_bad_status_bodies_are_422_naming_the_field(
    admin: Api, alice: Api, watcher: Api, body: dict[str, Any], field: str
) -> None:
    did = await confirming(admin, alice, watcher)
    problem = await report(watcher, did, 422, **body)
    assert problem["code"] == "validation_error"
    assert field in {e["field"] for e in problem["errors"]}
    deposit = await alice.get(f"/v1/deposits/{did}")
    assert (deposit["status"], deposit["version"]) == ("confirming", 2)
