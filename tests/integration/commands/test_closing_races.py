"""Races over real HTTP through two app instances (two "processes" on one database, sharing no in-process
lock or cache). Two ways to close one lock, reservation or deposit: exactly one wins, the loser gets the
stable code of a closed one, and the amount moves once. One Idempotency-Key or one If-Match version sent
to both: one execution. Debits racing a settle into their wallet: never an overdraft. The read models,
which either process may lead, end as a fold of the log."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import ClientResponse
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import STORE
from backend.commands import wallets as wallet_commands
from backend.commands.bus import CommandBus
from backend.commands.context import SYSTEM, CommandContext
from backend.config import Settings
from backend.domain import Wallet, wallet_stream
from backend.domain.errors import ReservationExpired, ReservationNotOpen
from backend.store.event_store import EventStore
from backend.store.repository import Repository
from tests.integration.http.test_http_model import read_models_equal_a_fold_of_the_log
from tests.integration.http.test_http_wallets import Api, open_funded
from tests.support import Client

ROUNDS = 6


@pytest.fixture
async def admin(client: Client, admin_headers: dict[str, str]) -> Api:
    return Api(client, admin_headers)


@pytest.fixture
async def two(aiohttp_client: AiohttpClient, settings: Settings, client: Client) -> tuple[Client, Client]:
    return client, await aiohttp_client(create_app(settings))


async def answer(response: ClientResponse) -> tuple[int, dict[str, Any]]:
    return response.status, orjson.loads(await response.read())


async def replayed(admin: Api, wallet_id: str) -> Wallet:
    """The wallet folded from its stream alone, with no cache of any process."""
    return await Repository(admin.client.app[STORE]).get(Wallet, uuid.UUID(wallet_id))


async def test_a_settle_racing_a_release_of_one_lock_moves_the_money_once(
    admin: Api, two: tuple[Client, Client]
) -> None:
    payer = await open_funded(admin, "alice", 100 * ROUNDS)
    payee = await open_funded(admin, "bob", 0)
    locks = [(await admin.post(f"/v1/wallets/{payer}/locks", {"amount": 100, "reason": "r"}, status=201))["lock_id"]
             for _ in range(ROUNDS)]
    calls = []
    for n, lock_id in enumerate(locks):
        settler, releaser = two[n % 2], two[(n + 1) % 2]
        calls.append(settler.post(f"/v1/wallets/{payer}/locks/{lock_id}/settle", json={"to_wallet_id": payee},
                                  headers=admin.headers))
        calls.append(releaser.post(f"/v1/wallets/{payer}/locks/{lock_id}/release", headers=admin.headers))
    answers = [await answer(r) for r in await asyncio.gather(*calls)]
    settled = 0
    for n in range(ROUNDS):
        (settle_status, settle), (release_status, release) = answers[2 * n], answers[2 * n + 1]
        assert sorted([settle_status, release_status]) == [200, 409], (settle, release)
        loser = settle if settle_status == 409 else release
        assert loser["code"] == "lock_not_open", loser
        settled += settle_status == 200
    wallet = await replayed(admin, payer)
    assert (wallet.balance, wallet.locked, wallet.locks) == (100 * (ROUNDS - settled), 0, {})
    assert (await replayed(admin, payee)).balance == 100 * settled
    assert Counter(wallet.closed_locks.get(uuid.UUID(lock_id)) for lock_id in locks) == \
        +Counter({"settled": settled, "released": ROUNDS - settled})
    read = await admin.get(f"/v1/wallets/{payer}")
    assert (read["balance"], read["locked"], read["available"]) == (wallet.balance, 0, wallet.balance)
    assert (await admin.get(f"/v1/wallets/{payee}"))["balance"] == 100 * settled
    await read_models_equal_a_fold_of_the_log(admin.client)


async def test_a_confirm_racing_a_rollback_of_one_reservation_charges_once_or_not_at_all(
    admin: Api, two: tuple[Client, Client]
) -> None:
    wid = await open_funded(admin, "alice", 100 * ROUNDS)
    rids = [(await admin.post(f"/v1/wallets/{wid}/reservations", {"amount": 100, "ttl_seconds": 3600},
                              status=201))["reservation_id"] for _ in range(ROUNDS)]
    calls = []
    for n, rid in enumerate(rids):
        calls.append(two[n % 2].post(f"/v1/wallets/{wid}/reservations/{rid}/confirm", json={"amount": 60},
                                     headers=admin.headers))
        calls.append(two[(n + 1) % 2].post(f"/v1/wallets/{wid}/reservations/{rid}/rollback", headers=admin.headers))
    answers = [await answer(r) for r in await asyncio.gather(*calls)]
    confirmed = 0
    for n in range(ROUNDS):
        (c_status, c_body), (r_status, r_body) = answers[2 * n], answers[2 * n + 1]
        assert sorted([c_status, r_status]) == [200, 409], (c_body, r_body)
        assert (c_body if c_status == 409 else r_body)["code"] == "reservation_not_open"
        confirmed += c_status == 200
    wallet = await replayed(admin, wid)
    assert (wallet.balance, wallet.reserved, wallet.reservations) == (100 * ROUNDS - 60 * confirmed, 0, {})
    read = await admin.get(f"/v1/wallets/{wid}")
    assert (read["balance"], read["reserved"], read["available"]) == (wallet.balance, 0, wallet.balance)
    await read_models_equal_a_fold_of_the_log(admin.client)


async def test_the_same_idempotency_key_sent_to_two_processes_at_once_runs_once(
    admin: Api, two: tuple[Client, Client]
) -> None:
    """Every answer is the one execution's, byte for byte, or 409 idempotency_in_flight from the process
    that ran it; the other process finds the stored outcome under the store's lock."""
    wid = await open_funded(admin, "alice", 1000)
    for n in range(ROUNDS):
        key = {**admin.headers, "Idempotency-Key": f"race-{n}"}
        body = {"amount": 10, "reference": f"once-{n}"}
        responses = await asyncio.gather(*(
            two[i % 2].post(f"/v1/wallets/{wid}/debits", json=body, headers=key) for i in range(6)))
        bodies = [(r.status, await r.read()) for r in responses]
        done = {b for status, b in bodies if status == 200}
        assert len(done) == 1, bodies
        others = [orjson.loads(b)["code"] for status, b in bodies if status != 200]
        assert set(others) <= {"idempotency_in_flight"}, bodies
        assert orjson.loads(done.pop())["balance"] == 1000 - 10 * (n + 1)
    assert (await replayed(admin, wid)).balance == 1000 - 10 * ROUNDS


@pytest.mark.parametrize("create", ["wallet", "reservation", "lock", "deposit"])
async def test_a_creation_sent_with_one_idempotency_key_to_two_processes_creates_one(
    admin: Api, two: tuple[Client, Client], create: str
) -> None:
    """The new id is drawn per request, so each process decides on a stream of its own: only the stored
    key stops the second from creating another, and its answer names the first one's id."""
    wid = await open_funded(admin, "alice", 1000)
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    path, body, made = {
        "wallet": ("/v1/wallets", {"owner": owner, "currency": "USD"}, "WalletOpened"),
        "reservation": (f"/v1/wallets/{wid}/reservations", {"amount": 5, "ttl_seconds": 3600}, "CreditReserved"),
        "lock": (f"/v1/wallets/{wid}/locks", {"amount": 5, "reason": "r"}, "FundsLocked"),
        "deposit": ("/v1/deposits", {"wallet_id": wid, "currency": "USD"}, "DepositCreated"),
    }[create]
    store = admin.client.app[STORE]
    before = await store.head()
    headers = {**admin.headers, "Idempotency-Key": f"create-{uuid.uuid4()}"}
    responses = await asyncio.gather(*(two[i % 2].post(path, json=body, headers=headers) for i in range(6)))
    bodies = [(r.status, await r.read()) for r in responses]
    assert len({b for status, b in bodies if status == 201}) == 1, bodies
    assert {orjson.loads(b)["code"] for status, b in bodies if status != 201} <= {"idempotency_in_flight"}
    created = [e async for e in store.iter_all(before, types=[made])]
    assert len(created) == 1, created


@pytest.mark.parametrize("ending", ["failed", "expired"])
async def test_a_deposit_confirmed_by_one_process_and_ended_by_another_credits_once_or_never(
    admin: Api, two: tuple[Client, Client], ending: str
) -> None:
    wid = await open_funded(admin, "alice", 0)
    deposits = []
    for _ in range(ROUNDS):
        deposit = await admin.post("/v1/deposits", {"wallet_id": wid, "currency": "USD"}, status=201)
        await admin.post(f"/v1/deposits/{deposit['deposit_id']}/status", {"status": "confirming", "confirmations": 1},
                         status=200)
        deposits.append(deposit["deposit_id"])
    calls = []
    for n, did in enumerate(deposits):
        confirm = {"status": "confirmed", "amount": 10, "chain_tx_id": f"tx-{uuid.uuid4()}"}
        end = {"status": ending, **({"reason": "dropped"} if ending == "failed" else {})}
        calls.append(two[n % 2].post(f"/v1/deposits/{did}/status", json=confirm, headers=admin.headers))
        calls.append(two[(n + 1) % 2].post(f"/v1/deposits/{did}/status", json=end, headers=admin.headers))
    answers = [await answer(r) for r in await asyncio.gather(*calls)]
    confirmed = 0
    for n, did in enumerate(deposits):
        (c_status, c_body), (e_status, e_body) = answers[2 * n], answers[2 * n + 1]
        assert sorted([c_status, e_status]) == [200, 409], (c_body, e_body)
        assert (c_body if c_status == 409 else e_body)["code"] == "invalid_transition"
        confirmed += c_status == 200
        read = await admin.get(f"/v1/deposits/{did}")
        assert read["status"] == ("confirmed" if c_status == 200 else ending)
    assert (await replayed(admin, wid)).balance == 10 * confirmed
    assert (await admin.get(f"/v1/wallets/{wid}"))["balance"] == 10 * confirmed


async def test_conditional_commands_on_one_version_sent_to_two_processes_let_one_through(
    admin: Api, two: tuple[Client, Client]
) -> None:
    """If-Match names the version a client saw: of the commands sent on it, one is applied and every
    other is 412 precondition_failed, whichever process takes it (a settle too, on two streams)."""
    payer = await open_funded(admin, "alice", 1000)
    payee = await open_funded(admin, "bob", 0)
    for version in range(2, 6):
        headers = {**admin.headers, "If-Match": f'"{version}"'}
        answers = [await answer(r) for r in await asyncio.gather(*(
            two[i % 2].post(f"/v1/wallets/{payer}/debits", json={"amount": 1, "reference": "x"}, headers=headers)
            for i in range(6)))]
        assert Counter((s, b.get("code")) for s, b in answers) == {(200, None): 1, (412, "precondition_failed"): 5}
    locks = [await admin.post(f"/v1/wallets/{payer}/locks", {"amount": 10, "reason": "r"}, status=201)
             for _ in range(4)]
    headers = {**admin.headers, "If-Match": f'"{locks[-1]["version"]}"'}
    answers = [await answer(r) for r in await asyncio.gather(*(
        two[i % 2].post(f"/v1/wallets/{payer}/locks/{lock['lock_id']}/settle", json={"to_wallet_id": payee},
                        headers=headers) for i, lock in enumerate(locks)))]
    assert Counter((s, b.get("code")) for s, b in answers) == {(200, None): 1, (412, "precondition_failed"): 3}
    wallet = await replayed(admin, payer)
    assert (wallet.balance, wallet.locked) == (1000 - 4 - 10, 30)
    assert (await replayed(admin, payee)).balance == 10


async def test_debits_racing_a_settle_into_their_wallet_never_overdraw(
    admin: Api, two: tuple[Client, Client]
) -> None:
    """The payee's debits run on either process while a settle credits it from the other: each debit is
    decided on a balance that includes the settlement or not, never on one the store does not hold."""
    payer = await open_funded(admin, "alice", 500)
    payee = await open_funded(admin, "bob", 100)
    lock = await admin.post(f"/v1/wallets/{payer}/locks", {"amount": 500, "reason": "r"}, status=201)
    settle = two[0].post(f"/v1/wallets/{payer}/locks/{lock['lock_id']}/settle", json={"to_wallet_id": payee},
                         headers=admin.headers)
    debits = [two[i % 2].post(f"/v1/wallets/{payee}/debits", json={"amount": 30, "reference": f"d{i}"},
                              headers=admin.headers) for i in range(30)]
    answers = [await answer(r) for r in await asyncio.gather(settle, *debits)]
    assert answers[0][0] == 200, answers[0]
    statuses = Counter((status, body.get("code")) for status, body in answers[1:])
    assert set(statuses) <= {(200, None), (422, "insufficient_funds")}, statuses
    won = statuses[(200, None)]
    assert won <= 600 // 30
    wallet = await replayed(admin, payee)
    assert wallet.balance == 600 - 30 * won >= 0
    events = await admin.client.app[STORE].read_stream(wallet_stream(uuid.UUID(payee)))
    balance = 0
    for event in events:
        sign = {"WalletCredited": 1, "SettlementReceived": 1, "WalletDebited": -1}.get(event.type, 0)
        balance += sign * int(event.data.get("amount", 0))
        assert balance >= 0, [e.type for e in events]
    await read_models_equal_a_fold_of_the_log(admin.client)


@pytest.fixture
async def buses(pool: asyncpg.Pool) -> AsyncIterator[list[CommandBus]]:
    made = [EventStore(pool) for _ in range(2)]
    try:
        yield [CommandBus(Repository(store)) for store in made]
    finally:
        for store in made:
            await store.close()


async def test_a_confirm_racing_the_expiry_of_its_reservation_closes_it_once(buses: list[CommandBus]) -> None:
    """One process confirms a reservation just before its deadline while another records its expiry at
    the deadline (each expiry takes every due reservation along): each reservation closes exactly once,
    a confirm that lost is told it expired, and the wallet is charged exactly what was confirmed."""
    one, other = buses
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    wallet_id = uuid.uuid4()
    repo = one.repository

    async def run(bus: CommandBus, now: datetime, decide: Any) -> Any:
        return await bus.execute(CommandContext(SYSTEM, now=now), [wallet_stream(wallet_id)], decide)

    await run(one, start, lambda ctx: wallet_commands.open_wallet(repo, ctx, wallet_id, "alice", "USD"))
    await run(one, start, lambda ctx: wallet_commands.credit(repo, ctx, wallet_id, 100 * ROUNDS, "seed", None))
    rids = [uuid.uuid4() for _ in range(ROUNDS)]
    deadlines = {}
    for n, rid in enumerate(rids):  # one second apart
        reply = await run(one, start + timedelta(seconds=n), lambda ctx, rid=rid: wallet_commands.reserve(
            repo, ctx, wallet_id, 100, 100, None, rid))
        deadlines[rid] = start + timedelta(seconds=n + 100)
        assert reply.position > 0
    calls = []
    for n, rid in enumerate(rids):
        confirmer, expirer = (one, other) if n % 2 else (other, one)
        calls.append(run(confirmer, deadlines[rid] - timedelta(milliseconds=1),
                         lambda ctx, rid=rid, bus=confirmer: wallet_commands.confirm(
                             bus.repository, ctx, wallet_id, rid, 70, None)))
        calls.append(run(expirer, deadlines[rid], lambda ctx, rid=rid, bus=expirer: wallet_commands.expire(
            bus.repository, ctx, wallet_id, rid)))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    events = await one.repository.store.read_stream(wallet_stream(wallet_id))
    closings = [(e.type, e.data["reservation_id"]) for e in events
                if e.type in ("ReservationConfirmed", "ReservationExpired", "ReservationRolledBack")]
    assert Counter(rid for _, rid in closings) == Counter({str(rid): 1 for rid in rids}), closings
    confirmed = {rid for kind, rid in closings if kind == "ReservationConfirmed"}
    for n, rid in enumerate(rids):
        confirm, expire = outcomes[2 * n], outcomes[2 * n + 1]
        if str(rid) in confirmed:
            assert not isinstance(confirm, BaseException), confirm
        else:
            assert isinstance(confirm, ReservationExpired), confirm
        # recorded, or found closed: confirmed, or expired already by a later deadline's expiry
        assert not isinstance(expire, BaseException) or isinstance(expire, ReservationNotOpen), expire
    wallet = await Repository(one.repository.store).get(Wallet, wallet_id)
    assert (wallet.balance, wallet.reserved, wallet.reservations) == (100 * ROUNDS - 70 * len(confirmed), 0, {})
