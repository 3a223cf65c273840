"""Random command sequences over real HTTP, sent to two app instances in turn, against a reference model
of two wallets, with time moved by the apps' clock and deposits through their statuses.

After every step: the write's answer and the read model's answer (read-your-writes, as of the write's
position) equal the model, with reservations due on the clock counted as expired whether or not the
expiry process has recorded it yet, and available = balance - locked - reserved >= 0. At the end: the
state as of each of the wallet's positions, and as of each event's time, equals a fold of its stream up to
there; every stream's hash chain verifies; the stats moved by what the model did; every read model is a
fold of the log."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import POOL, STORE
from backend.clock import ManualClock
from backend.config import Settings
from backend.domain import Wallet, wallet_stream
from backend.store.event_codec import fold
from projections import registry
from tests.conftest import bearer, mint_token
from tests.integration.http.test_http_wallets import Api
from tests.integration.projections.oracle import Rows, actual_tables, assert_same, expected_tables
from tests.support import Client, eventually

TX = itertools.count()


@dataclass
class Model:
    balance: int = 0
    locks: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, tuple[int, datetime]] = field(default_factory=dict)
    expired: set[str] = field(default_factory=set)

    def sweep(self, now: datetime) -> None:
        for rid, (_, due) in list(self.reservations.items()):
            if due <= now:
                del self.reservations[rid]
                self.expired.add(rid)

    def figures(self) -> dict[str, int]:
        locked, reserved = sum(self.locks.values()), sum(a for a, _ in self.reservations.values())
        return {"balance": self.balance, "locked": locked, "reserved": reserved,
                "available": self.balance - locked - reserved}


@pytest.fixture
async def clocked(aiohttp_client: AiohttpClient, settings: Settings) -> tuple[Client, ManualClock, list[Api]]:
    """Two app instances on one database (two processes, sharing no cache or lock) and one clock, ahead
    of the host's, which stamps recorded_at: an event's time is never in the apps' future."""
    clock = ManualClock(datetime.now(UTC) + timedelta(hours=1))
    client = await aiohttp_client(create_app(settings, clock))
    other = await aiohttp_client(create_app(settings, clock))
    headers = bearer(await mint_token(client.app, "operator", ["admin"]))
    return client, clock, [Api(client, headers), Api(other, headers)]


STEP = st.one_of(
    st.tuples(st.just("credit"), st.integers(0, 1), st.integers(1, 300)),
    st.tuples(st.just("debit"), st.integers(0, 1), st.integers(1, 300)),
    st.tuples(st.just("lock"), st.integers(0, 1), st.integers(1, 300)),
    st.tuples(st.just("release"), st.integers(0, 1), st.integers(0, 5)),
    st.tuples(st.just("settle"), st.integers(0, 1), st.integers(0, 5)),
    st.tuples(st.just("reserve"), st.integers(0, 1), st.integers(1, 300), st.integers(1, 60)),
    st.tuples(st.just("confirm"), st.integers(0, 1), st.integers(0, 5), st.none() | st.integers(1, 300)),
    st.tuples(st.just("rollback"), st.integers(0, 1), st.integers(0, 5)),
    st.tuples(st.just("deposit"), st.integers(0, 1), st.integers(1, 300)),
    st.tuples(st.just("wait"), st.integers(0, 90)),
)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=25), via=st.lists(st.integers(0, 1), min_size=8, max_size=8))
async def test_random_commands_over_http_match_the_model_and_the_log(
    clocked: tuple[Client, ManualClock, list[Api]], steps: list[tuple[Any, ...]], via: list[int]
) -> None:
    """Each request goes to one of two processes, as `via` says in turn."""
    client, clock, apis = clocked
    turns = itertools.cycle(via)
    admin = apis[0]
    before = await usd_totals(admin)
    flows = {"credited": 0, "debited": 0, "settled": 0}
    wallets = [(await admin.post("/v1/wallets", {"owner": o, "currency": "USD"}, status=201))["wallet_id"]
               for o in ("alice", "bob")]
    models = [Model(), Model()]
    lock_ids: list[tuple[int, str]] = []
    reservation_ids: list[tuple[int, str]] = []

    def pick(known: list[tuple[int, str]], i: int, n: int) -> str:
        mine = [x for w, x in known if w == i]
        return mine[n % len(mine)] if mine and n < len(mine) + 1 else str(uuid.uuid4())

    async def post(path: str, body: dict[str, Any], status: int) -> dict[str, Any]:
        return await apis[next(turns)].post(path, body, status=status)

    for step in steps:
        op = step[0]
        if op == "wait":
            clock.advance(step[1])
            for m in models:
                m.sweep(clock.now())
            continue
        i, m, base = step[1], models[step[1]], f"/v1/wallets/{wallets[step[1]]}"
        m.sweep(clock.now())
        written: dict[str, Any] | None = None
        if op == "credit":
            written = await post(f"{base}/credits", {"amount": step[2], "reference": "c"}, 200)
            m.balance += step[2]
            flows["credited"] += step[2]
        elif op in ("debit", "lock", "reserve"):
            ok = step[2] <= m.figures()["available"]
            path, body = {"debit": ("debits", {"amount": step[2], "reference": "d"}),
                          "lock": ("locks", {"amount": step[2], "reason": "r"}),
                          "reserve": ("reservations", {"amount": step[2], "ttl_seconds": step[-1]})}[op]
            answer = await post(f"{base}/{path}", body, (201 if op != "debit" else 200) if ok else 422)
            if not ok:
                assert answer["code"] == "insufficient_funds"
            elif op == "debit":
                written, m.balance = answer, m.balance - step[2]
                flows["debited"] += step[2]
            elif op == "lock":
                written, m.locks[answer["lock_id"]] = answer, step[2]
                lock_ids.append((i, answer["lock_id"]))
            else:
                written = answer
                m.reservations[answer["reservation_id"]] = (step[2], clock.now() + timedelta(seconds=step[-1]))
                reservation_ids.append((i, answer["reservation_id"]))
        elif op in ("release", "settle"):
            lock_id = pick(lock_ids, i, step[2])
            j = 1 - i
            path, body = (f"{base}/locks/{lock_id}/release", {}) if op == "release" else (
                f"{base}/locks/{lock_id}/settle", {"to_wallet_id": wallets[j]})
            if lock_id in m.locks:
                written = await post(path, body, 200)
                amount = m.locks.pop(lock_id)
                if op == "settle":
                    m.balance -= amount
                    models[j].balance += amount
                    flows["settled"] += amount
            else:
                assert (await post(path, body, 409))["code"] == "lock_not_open"
        elif op in ("confirm", "rollback"):
            rid = pick(reservation_ids, i, step[2])
            body = {"amount": step[3]} if op == "confirm" and step[3] is not None else {}
            path = f"{base}/reservations/{rid}/{op}"
            if rid in m.reservations:
                reserved = m.reservations[rid][0]
                charged = body.get("amount", reserved)
                if charged > reserved:
                    assert (await post(path, body, 422))["code"] == "amount_exceeds_reserved"
                else:
                    written = await post(path, body, 200)
                    del m.reservations[rid]
                    charged = charged if op == "confirm" else 0
                    m.balance -= charged
                    flows["debited"] += charged
            else:
                code = "reservation_expired" if rid in m.expired else "reservation_not_open"
                assert (await post(path, body, 409))["code"] == code
        elif op == "deposit":
            deposit = await post("/v1/deposits", {"wallet_id": wallets[i], "currency": "USD"}, 201)
            status = f"/v1/deposits/{deposit['deposit_id']}/status"
            await post(status, {"status": "confirming", "confirmations": 1}, 200)
            report = {"status": "confirmed", "amount": step[2], "chain_tx_id": f"tx-{next(TX)}-{uuid.uuid4()}"}
            confirmed = await post(status, report, 200)
            m.balance += step[2]
            flows["credited"] += step[2]
            written = confirmed["wallet"]
            written["position"] = confirmed["position"]
            again = await post(status, report, 409)
            assert again["code"] == "invalid_transition"
        for k in (0, 1):
            expected = models[k].figures()
            assert expected["available"] >= 0
            if written is not None and k == i:
                assert {f: written[f] for f in expected} == expected, (step, written)
            read = await apis[next(turns)].get(f"/v1/wallets/{wallets[k]}")
            assert {f: read[f] for f in expected} == expected, (step, read)
            assert {x["lock_id"]: x["amount"] for x in read["locks"]} == models[k].locks
            assert {x["reservation_id"]: x["amount"] for x in read["reservations"]} == \
                {r: a for r, (a, _) in models[k].reservations.items()}

    after = await usd_totals(admin)
    assert {k: after[k] - before[k] for k in (*flows, "wallets", "locked")} == \
        {**flows, "wallets": 2, "locked": sum(sum(m.locks.values()) for m in models)}
    assert sum(m.balance for m in models) == flows["credited"] - flows["debited"]

    store = client.app[STORE]
    for wid in wallets:
        events = await store.read_stream(wallet_stream(uuid.UUID(wid)))
        folded: Wallet | None = None
        for event in events:
            folded = await fold_to(client, wid, event.position)
            state = await admin.get(f"/v1/wallets/{wid}/state?at_position={event.position}")
            assert folded is not None
            assert (state["balance"], state["locked"], state["version"]) == \
                (folded.balance, folded.locked, folded.version)
            assert state["position"] == event.position
            moment = quote(event.recorded_at.isoformat())
            at_time = await admin.get(f"/v1/wallets/{wid}/state?as_of={moment}")
            then = fold([e for e in events if e.recorded_at <= event.recorded_at], None, uuid.UUID(wid))
            assert isinstance(then, Wallet)
            assert (at_time["balance"], at_time["locked"], at_time["version"]) == \
                (then.balance, then.locked, then.version)
        verified = await admin.get(f"/v1/audit/verify?stream=wallet-{wid}")
        assert verified["ok"] and verified["events_checked"] == len(events), verified
    await read_models_equal_a_fold_of_the_log(client)


async def read_models_equal_a_fold_of_the_log(client: Client) -> None:
    """Once the app's runners have applied the whole log, every read model is a fold of it, row by row.
    The expiry runner may append meanwhile (the clock has moved reservations past due): a comparison
    is only taken while the log stood still between reading the read models and folding the log."""
    pool = client.app[POOL]

    async def head() -> int:
        return int(await pool.fetchval("select coalesce(max(position), 0) from events"))

    async def caught_up() -> int | None:
        at = await head()
        rows = await pool.fetch("select position from projection_checkpoints where name = any($1)", registry.names())
        applied = len(rows) == len(registry.names()) and all(row["position"] >= at for row in rows)
        return at if applied else None

    async def still() -> tuple[dict[str, Rows], dict[str, Rows]] | None:
        at = await eventually(caught_up, what="the projections to apply the whole log")
        actual, expected = await actual_tables(pool), await expected_tables(client.app[STORE])
        return (actual, expected) if await head() == at else None

    actual, expected = await eventually(still, what="the log to stand still while it is compared")
    assert_same(actual, expected)


async def usd_totals(admin: Api) -> dict[str, int]:
    """The stats read model's USD figures (zeros before the first USD wallet)."""
    figures = (await admin.get("/v1/stats"))["currencies"].get("USD", {})
    return {k: figures.get(k, 0) for k in ("wallets", "credited", "debited", "settled", "locked")}


async def fold_to(client: Client, wallet_id: str, position: int) -> Wallet | None:
    """The wallet folded from its stream's events up to a position, with the domain's own events."""
    events = [e for e in await client.app[STORE].read_stream(wallet_stream(uuid.UUID(wallet_id)))
              if e.position <= position]
    folded = fold(events, None, uuid.UUID(wallet_id))
    assert folded is None or isinstance(folded, Wallet)
    return folded
