"""The read endpoints over HTTP: read-your-writes (wait, 503), wallets with locks and reservations,
pages with cursors, reservations, deposits, stats, projection status, and who may see what."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.config import Settings
from tests.conftest import bearer, mint_token
from tests.integration.projections.harness import Node, settings_for
from tests.support import Client

WALLET_FIELDS = {"wallet_id", "owner", "currency", "balance", "available", "locked", "reserved", "version"}


class Api:
    def __init__(self, client: Client, token: str) -> None:
        self.client = client
        self.headers = bearer(token)

    async def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = await self.client.post(path, json=body or {}, headers=self.headers)
        assert response.status in (200, 201), await response.text()
        return dict(await response.json())

    async def get(self, path: str, status: int = 200, **headers: str) -> tuple[dict[str, Any], Any]:
        response = await self.client.get(path, headers={**self.headers, **headers})
        assert response.status == status, await response.text()
        return dict(await response.json(content_type=None)), response.headers


async def open_app(aiohttp_client: AiohttpClient, settings: Settings) -> tuple[Client, Api]:
    client = await aiohttp_client(create_app(settings))
    return client, Api(client, await mint_token(client.app, "operator", ["admin"]))


async def user(client: Client, owner: str) -> Api:
    return Api(client, await mint_token(client.app, owner, ["wallets:read", "wallets:write"]))


async def test_read_your_writes_waits_for_a_projection_running_elsewhere(
    own_database_url: str, aiohttp_client: AiohttpClient
) -> None:
    """This app runs no projections; a separate process (a Node) does, and only starts later."""
    _, admin = await open_app(aiohttp_client, settings_for(own_database_url, run_projections=False))
    wallet = await admin.post("/v1/wallets", {"owner": "alice", "currency": "USD"})
    credited = await admin.post(f"/v1/wallets/{wallet['wallet_id']}/credits", {"amount": 700, "reference": "x"})
    position = credited["position"]

    read = asyncio.create_task(admin.get(f"/v1/wallets/{wallet['wallet_id']}?min_position={position}",
                                         Prefer="wait=10"))
    worker = await Node.open(own_database_url)
    try:
        await worker.start()
        body, headers = await read
    finally:
        await worker.close()
    assert body["balance"] == 700 and body["version"] == 2
    assert int(headers["X-Projection-Position"]) >= position

    later = await admin.post(f"/v1/wallets/{wallet['wallet_id']}/credits", {"amount": 1, "reference": "y"})
    problem, headers = await admin.get(f"/v1/wallets/{wallet['wallet_id']}", 503,  # no runner is left to apply it
                                       **{"X-Min-Position": str(later["position"]), "Prefer": "wait=0.2"})
    assert problem["code"] == "unavailable" and problem["min_position"] == later["position"]
    assert headers["Retry-After"] == "1" and int(headers["X-Projection-Position"]) >= position
    # Beyond the head: no answer ever gave such a position, so it is refused at once, not waited for.
    beyond_header, _ = await admin.get(f"/v1/wallets/{wallet['wallet_id']}", 400, Prefer="wait=10",
                                       **{"X-Min-Position": str(later["position"] + 1)})
    beyond_query, _ = await admin.get(f"/v1/wallets/{wallet['wallet_id']}?min_position={later['position'] + 1000}",
                                      400, Prefer="wait=10")
    for problem, field in ((beyond_header, "X-Min-Position"), (beyond_query, "min_position")):
        assert (problem["code"], problem["field"]) == ("validation_error", field), problem
        assert f"head of the log ({later['position']})" in problem["detail"]
    for bad in ("soon", "-1", str(2**63)):  # 2**63: no position can ever reach it, so no waiting
        problem, _ = await admin.get(f"/v1/stats?min_position={bad}", 400)
        assert problem["code"] == "validation_error" and problem["field"] == "min_position"


@pytest.fixture
async def live(own_database_url: str, aiohttp_client: AiohttpClient) -> tuple[Client, Api]:
    """An app running every projection (the database outlives the app: it is set up first)."""
    return await open_app(aiohttp_client, settings_for(own_database_url))


async def test_wallet_with_its_open_locks_and_reservations(live: tuple[Client, Api]) -> None:
    client, admin = live
    wallet = await admin.post("/v1/wallets", {"owner": "alice", "currency": "EUR"})
    wid = wallet["wallet_id"]
    await admin.post(f"/v1/wallets/{wid}/credits", {"amount": 1000, "reference": "seed"})
    lock = await admin.post(f"/v1/wallets/{wid}/locks", {"amount": 200, "reason": "escrow"})
    reserved = await admin.post(f"/v1/wallets/{wid}/reservations", {"amount": 150, "ttl_seconds": 600})

    body, headers = await admin.get(f"/v1/wallets/{wid}", 200, **{"X-Min-Position": str(reserved["position"])})
    assert {k: body[k] for k in WALLET_FIELDS} == {k: reserved[k] for k in WALLET_FIELDS}
    assert (body["balance"], body["locked"], body["reserved"], body["available"]) == (1000, 200, 150, 650)
    assert [(x["lock_id"], x["amount"], x["reason"]) for x in body["locks"]] == [(lock["lock_id"], 200, "escrow")]
    assert [(x["reservation_id"], x["amount"], x["expires_at"]) for x in body["reservations"]] == \
        [(reserved["reservation_id"], 150, reserved["expires_at"])]
    assert headers["ETag"] == f'"{body["version"]}"'

    found, _ = await admin.get(f"/v1/reservations/{reserved['reservation_id']}?min_position={reserved['position']}")
    assert (found["status"], found["amount"], found["wallet_id"], found["owner"]) == ("open", 150, wid, "alice")
    confirmed = await admin.post(f"/v1/wallets/{wid}/reservations/{reserved['reservation_id']}/confirm",
                                 {"amount": 100})
    found, _ = await admin.get(f"/v1/reservations/{reserved['reservation_id']}?min_position={confirmed['position']}")
    assert (found["status"], found["confirmed_amount"]) == ("confirmed", 100)

    alice, bob = await user(client, "alice"), await user(client, "bob")
    await alice.get(f"/v1/wallets/{wid}")
    await alice.get(f"/v1/reservations/{reserved['reservation_id']}")
    problem, _ = await bob.get(f"/v1/wallets/{wid}", 403)
    assert problem["code"] == "forbidden"
    await bob.get(f"/v1/reservations/{reserved['reservation_id']}", 403)
    problem, headers = await bob.get("/v1/wallets/00000000-0000-0000-0000-000000000001", 404)
    assert problem["code"] == "not_found" and "X-Projection-Position" in headers
    await bob.get("/v1/reservations/00000000-0000-0000-0000-000000000001", 404)
    await bob.get("/v1/reservations/not-a-uuid", 404)


async def test_wallet_pages_by_owner_with_a_cursor(live: tuple[Client, Api]) -> None:
    client, admin = live
    mine = sorted([(await admin.post("/v1/wallets", {"owner": "alice", "currency": "USD"}))["wallet_id"]
                   for _ in range(7)])
    last = await admin.post("/v1/wallets", {"owner": "bob", "currency": "USD"})
    alice = await user(client, "alice")

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = f"/v1/wallets?limit=3&min_position={last['position']}" + (f"&cursor={cursor}" if cursor else "")
        body, _ = await alice.get(query)
        pages += 1
        seen += [w["wallet_id"] for w in body["data"]]
        assert all(set(w) == WALLET_FIELDS and w["owner"] == "alice" for w in body["data"])
        cursor = body["next_cursor"]
        assert body["has_more"] == (cursor is not None)
        if cursor is None:
            break
    assert (seen, pages) == (mine, 3)

    everyone, _ = await admin.get("/v1/wallets?limit=500")
    assert set(mine) | {last["wallet_id"]} <= {w["wallet_id"] for w in everyone["data"]}
    only_bob, _ = await admin.get("/v1/wallets?owner=bob")
    assert [w["wallet_id"] for w in only_bob["data"]] == [last["wallet_id"]]
    problem, _ = await alice.get("/v1/wallets?owner=bob", 403)
    assert problem["code"] == "forbidden"
    mine_again, _ = await alice.get("/v1/wallets?owner=&cursor=&limit=500")  # empty parameters are absent
    assert [w["wallet_id"] for w in mine_again["data"]] == mine
    for bad in ("limit=0", "limit=501", "limit=x", "cursor=%%%"):
        problem, _ = await alice.get(f"/v1/wallets?{bad}", 400)
        assert problem["code"] == "validation_error"


async def test_deposits_stats_and_projection_status(live: tuple[Client, Api]) -> None:
    client, admin = live
    wallet = await admin.post("/v1/wallets", {"owner": "alice", "currency": "USD"})
    deposit = await admin.post("/v1/deposits", {"wallet_id": wallet["wallet_id"], "currency": "USD"})
    await admin.post(f"/v1/deposits/{deposit['deposit_id']}/status", {"status": "confirming", "confirmations": 1})
    changed = await admin.post(f"/v1/deposits/{deposit['deposit_id']}/status",
                               {"status": "confirmed", "confirmations": 6, "amount": 2500, "chain_tx_id": "tx-1"})

    found, headers = await admin.get(f"/v1/deposits/{deposit['deposit_id']}?min_position={changed['position']}")
    assert (found["status"], found["amount"], found["confirmations"], found["address"]) == \
        ("confirmed", 2500, 6, deposit["address"])
    assert headers["ETag"] == f'"{found["version"]}"'
    assert set(found) == {"deposit_id", "wallet_id", "currency", "address", "status", "confirmations", "amount",
                          "chain_tx_id", "failure_reason", "version"}  # as the deposit commands answer
    alice, bob = await user(client, "alice"), await user(client, "bob")
    await alice.get(f"/v1/deposits/{deposit['deposit_id']}")
    await bob.get(f"/v1/deposits/{deposit['deposit_id']}", 403)
    await bob.get("/v1/deposits/00000000-0000-0000-0000-000000000001", 404)

    figures, _ = await alice.get(f"/v1/stats?min_position={changed['position']}")
    usd = figures["currencies"]["USD"]
    assert (usd["wallets"], usd["credited"], usd["deposits"]) == (1, 2500, {"confirmed": 1})
    assert figures["events"]["DepositConfirmed"] == 1 and figures["events"]["WalletOpened"] == 1

    listed, _ = await admin.get("/v1/projections")
    states = {p["name"]: p for p in listed["projections"]}
    assert set(states) == {"balances", "reservations", "deposits", "api_keys", "stats", "expiry"}
    assert all(p["state"] == "running" and p["leader"].startswith(f"tally-projection-{name}-")
               for name, p in states.items())
    problem, _ = await alice.get("/v1/projections", 403)
    assert problem["code"] == "forbidden"
