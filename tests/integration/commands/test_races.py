"""Invariants under concurrency, over real HTTP against the real store."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.app import create_app
from backend.appkeys import REPOSITORY
from backend.domain import Wallet
from backend.store.repository import Repository
from tests.integration.http.test_http_wallets import Api, open_funded
from tests.support import Client


@pytest.fixture
async def admin(client: Client, admin_headers: dict[str, str]) -> Api:
    return Api(client, admin_headers)


async def test_100_concurrent_debits_succeed_exactly_as_far_as_funds_go(admin: Api, client: Client) -> None:
    wid = await open_funded(admin, amount=1000)
    path = f"/v1/wallets/{wid}/debits"
    responses = await asyncio.gather(*(
        client.post(path, json={"amount": 30, "reference": f"d{i}"}, headers=admin.headers) for i in range(100)
    ))
    statuses = [r.status for r in responses]
    codes = [(await r.json(content_type=None)).get("code") for r in responses if r.status != 200]
    assert statuses.count(200) == 1000 // 30
    assert statuses.count(422) == 100 - 1000 // 30
    assert set(codes) == {"insufficient_funds"}
    wallet = await admin.get(f"/v1/wallets/{wid}")
    assert wallet["balance"] == 1000 - 30 * (1000 // 30)
    assert wallet["version"] == 2 + 1000 // 30


async def test_two_app_instances_racing_on_one_wallet_never_overdraw(aiohttp_client, settings, admin: Api) -> None:  # type: ignore[no-untyped-def]
    other = await aiohttp_client(create_app(settings))
    wid = await open_funded(admin, amount=500)
    clients = [admin.client, other]
    responses = await asyncio.gather(*(
        clients[i % 2].post(f"/v1/wallets/{wid}/debits", json={"amount": 7, "reference": f"x{i}"},
                            headers=admin.headers)
        for i in range(120)
    ))
    succeeded = sum(r.status == 200 for r in responses)
    assert {r.status for r in responses} <= {200, 422}
    assert succeeded == 500 // 7
    assert (await admin.get(f"/v1/wallets/{wid}"))["balance"] == 500 - 7 * succeeded


OPS = st.lists(
    st.tuples(st.sampled_from(["debit", "lock", "release", "reserve", "confirm", "rollback", "credit"]),
              st.integers(min_value=1, max_value=400)),
    min_size=5, max_size=30,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, seed=st.integers(0, 2**16))
async def test_random_concurrent_commands_keep_the_invariant(admin: Api, client: Client, ops, seed) -> None:  # type: ignore[no-untyped-def]
    """Fire a random mix concurrently; whatever interleaving happens, the books must balance."""
    rng = random.Random(seed)
    wid = await open_funded(admin, amount=1000)
    locks: list[str] = []
    reservations: list[str] = []

    async def run(op: str, amount: int) -> None:
        base = f"/v1/wallets/{wid}"
        if op in ("debit", "credit"):
            path = f"{base}/{op}s"
            await client.post(path, json={"amount": amount, "reference": op}, headers=admin.headers)
        elif op == "lock":
            r = await client.post(f"{base}/locks", json={"amount": amount, "reason": "r"}, headers=admin.headers)
            if r.status == 201:
                locks.append((await r.json())["lock_id"])
        elif op == "reserve":  # for an hour: none falls due while the suite runs and appends to the shared log
            r = await client.post(f"{base}/reservations", json={"amount": amount, "ttl_seconds": 3600},
                                  headers=admin.headers)
            if r.status == 201:
                reservations.append((await r.json())["reservation_id"])
        elif op == "release" and locks:
            await client.post(f"{base}/locks/{rng.choice(locks)}/release", headers=admin.headers)
        elif op in ("confirm", "rollback") and reservations:
            await client.post(f"{base}/reservations/{rng.choice(reservations)}/{op}", headers=admin.headers)

    await asyncio.gather(*(run(op, amount) for op, amount in ops))
    wallet = await admin.get(f"/v1/wallets/{wid}")
    assert wallet["available"] == wallet["balance"] - wallet["locked"] - wallet["reserved"] >= 0
    # The state served equals a replay of the stream from scratch.
    repo = client.app[REPOSITORY]
    replayed = await Repository(repo.store).get(Wallet, uuid.UUID(wid))
    assert (replayed.balance, replayed.locked, replayed.reserved, replayed.version) == (
        wallet["balance"], wallet["locked"], wallet["reserved"], wallet["version"])
    assert replayed.locked == sum(replayed.locks.values())
    assert replayed.reserved == sum(r.amount for r in replayed.reservations.values())
