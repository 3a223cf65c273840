"""The history API checked against a fold of the log written here, sharing no code with Tally's domain:
random commands over real HTTP (some appended while the log is paged), then every page, the export and
the state of each wallet as of positions and times compared with what the events themselves say.

The fold reads only the exported event shape (`type`, `data`, `position`, `recorded_at`) and counts a
reservation whose `expires_at` has passed as expired, as docs/AUDIT.md says a wallet as it was is viewed."""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from tests.conftest import bearer, make_settings, mint_token
from tests.support import Client, eventually

PROBLEM = "application/problem+json"
ONE_US = timedelta(microseconds=1)


class Http:
    def __init__(self, client: Client, token: str) -> None:
        self.client = client
        self.headers = bearer(token)

    async def get(self, path: str, params: dict[str, Any] | None = None, *, status: int = 200) -> Any:
        response = await self.client.get(path, params=params, headers=self.headers)
        text = await response.text()
        assert response.status == status, (path, params, text)
        if status >= 400:
            assert response.content_type == PROBLEM, text
        return orjson.loads(text)

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        response = await self.client.post(path, json=body, headers=self.headers)
        return response.status, orjson.loads(await response.read())


@dataclass
class Folded:
    """A wallet as its events say, folded here."""

    balance: int = 0
    locks: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, tuple[int, datetime]] = field(default_factory=dict)
    version: int = 0
    position: int = 0

    def apply(self, event: dict[str, Any]) -> None:
        data, kind = event["data"], event["type"]
        amount = data.get("amount", 0)
        if kind in ("WalletCredited", "SettlementReceived", "DepositCredited"):
            self.balance += amount
        elif kind == "WalletDebited":
            self.balance -= amount
        elif kind == "FundsLocked":
            self.locks[data["lock_id"]] = amount
        elif kind in ("LockReleased", "LockSettled"):
            del self.locks[data["lock_id"]]
            self.balance -= amount if kind == "LockSettled" else 0
        elif kind == "CreditReserved":
            self.reservations[data["reservation_id"]] = (amount, datetime.fromisoformat(data["expires_at"]))
        elif kind in ("ReservationConfirmed", "ReservationRolledBack", "ReservationExpired"):
            del self.reservations[data["reservation_id"]]
            self.balance -= amount if kind == "ReservationConfirmed" else 0
        else:
            assert kind == "WalletOpened", kind
        self.version = event["version"]
        self.position = event["position"]

    def view(self, at: datetime) -> dict[str, int]:
        locked = sum(self.locks.values())
        reserved = sum(amount for amount, due in self.reservations.values() if due > at)
        return {"balance": self.balance, "locked": locked, "reserved": reserved,
                "available": self.balance - locked - reserved, "version": self.version, "position": self.position}


def fold(events: list[dict[str, Any]]) -> Folded | None:
    if not events:
        return None
    folded = Folded()
    for event in events:
        folded.apply(event)
    return folded


def when(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["recorded_at"])


async def every_page(api: Http, path: str, params: dict[str, Any], limit: int, after: int = 0
                     ) -> list[dict[str, Any]]:
    """Every event of a paged history after a cursor, checking each page's order and cursor on the way."""
    events: list[dict[str, Any]] = []
    cursor = str(after)
    while True:
        page = await api.get(path, {**params, "cursor": cursor, "limit": limit})
        assert len(page["data"]) <= limit
        keys = [e["position"] for e in page["data"]]
        assert keys == sorted(set(keys)), page
        events.extend(page["data"])
        assert int(page["next_cursor"]) >= int(cursor)
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return events


class Ledger:
    """Two wallets, driven by random commands over HTTP; what the server answers is taken as it comes:
    the fold of the log, not a model of the commands, is what the history is checked against."""

    def __init__(self, admin: Http, wallets: list[str], rng: random.Random) -> None:
        self.admin = admin
        self.wallets = wallets
        self.rng = rng
        self.locks: list[tuple[int, str]] = []
        self.reservations: list[tuple[int, str]] = []

    async def step(self, op: str, amount: int, short: bool) -> None:
        rng = self.rng
        i = rng.randrange(2)
        base = f"/v1/wallets/{self.wallets[i]}"
        if op == "credit":
            await self.admin.post(f"{base}/credits", {"amount": amount, "reference": "c"})
        elif op == "debit":
            await self.admin.post(f"{base}/debits", {"amount": amount, "reference": "d"})
        elif op == "lock":
            status, body = await self.admin.post(f"{base}/locks", {"amount": amount, "reason": "r"})
            if status == 201:
                self.locks.append((i, body["lock_id"]))
        elif op in ("release", "settle") and self.locks:
            w, lock_id = self.locks.pop(rng.randrange(len(self.locks)))
            body = {} if op == "release" else {"to_wallet_id": self.wallets[1 - w]}
            await self.admin.post(f"/v1/wallets/{self.wallets[w]}/locks/{lock_id}/{op}", body)
        elif op == "reserve":
            status, body = await self.admin.post(f"{base}/reservations",
                                                 {"amount": amount, "ttl_seconds": 1 if short else 3600})
            if status == 201:
                self.reservations.append((i, body["reservation_id"]))
        elif op in ("confirm", "rollback") and self.reservations:
            w, rid = self.reservations.pop(rng.randrange(len(self.reservations)))
            body = {"amount": amount} if op == "confirm" and rng.random() < 0.5 else {}
            await self.admin.post(f"/v1/wallets/{self.wallets[w]}/reservations/{rid}/{op}", body)


OPS = st.sampled_from(["credit", "credit", "debit", "lock", "release", "settle", "reserve", "confirm", "rollback"])
STEP = st.tuples(OPS, st.integers(1, 400), st.booleans())


@pytest.fixture
async def apis(aiohttp_client: AiohttpClient, database_url: str) -> tuple[Http, Http]:
    client = await aiohttp_client(create_app(make_settings(database_url, rate_limit_per_s=0)))
    return (Http(client, await mint_token(client.app, "operator", ["admin"])),
            Http(client, await mint_token(client.app, "auditor", ["audit:read"])))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=4, max_size=24), concurrent=st.lists(STEP, min_size=4, max_size=16),
       seed=st.integers(0, 2**32), limit=st.integers(1, 7))
async def test_history_agrees_with_a_fold_of_the_log(apis: tuple[Http, Http], steps: list[tuple[str, int, bool]],
                                                     concurrent: list[tuple[str, int, bool]], seed: int,
                                                     limit: int) -> None:
    admin, auditor = apis
    rng = random.Random(seed)
    owner = f"fold-{uuid.uuid4().hex[:12]}"
    start = (await auditor.get("/v1/events", {"cursor": 0, "limit": 1}))["head"]
    wallets = []
    for _ in range(2):
        status, body = await admin.post("/v1/wallets", {"owner": owner, "currency": "USD"})
        assert status == 201, body
        wallets.append(body["wallet_id"])
        await admin.post(f"/v1/wallets/{body['wallet_id']}/credits", {"amount": 2000, "reference": "seed"})
    ledger = Ledger(admin, wallets, rng)
    for op, amount, short in steps:
        await ledger.step(op, amount, short)

    # Page the log (whole, by type, by wallet) while more commands are appended.
    async def append_more() -> None:
        for op, amount, short in concurrent:
            await ledger.step(op, amount, short)

    appending = asyncio.create_task(append_more())
    stream_ids = [f"wallet-{w}" for w in wallets]
    paged_during = await every_page(auditor, "/v1/events", {}, limit, after=start)
    await appending
    # Short reservations (1 s) expire soon: wait until the log records each, so that some
    # as-of times fall between a deadline and the ReservationExpired after it.
    async def expiries_recorded() -> bool:
        for stream_id in stream_ids:
            events = (await auditor.get(f"/v1/streams/{stream_id}/events", {"limit": 1000}))["data"]
            folded = fold(events)
            assert folded is not None
            if any(due <= datetime.now(UTC) + timedelta(seconds=2) for _, due in folded.reservations.values()):
                return False
        return True

    await eventually(expiries_recorded, what="the expiry of every due reservation to be recorded")

    export = await auditor.client.get("/v1/events/export", headers=auditor.headers)
    assert export.status == 200
    exported = [orjson.loads(line) for line in (await export.read()).splitlines()]
    head = int(export.headers["X-Export-To"])
    assert [e["position"] for e in exported] == list(range(1, head + 1))
    by_position = {e["position"]: e for e in exported}
    cut = rng.randrange(start, head + 1)  # an export resumed from its last line is the same bytes
    pieces = [await auditor.client.get("/v1/events/export", params=r, headers=auditor.headers)
              for r in ({"after": start, "to": cut}, {"after": cut, "to": head})]
    assert b"".join([await piece.read() for piece in pieces]) == b"".join(
        orjson.dumps(e) + b"\n" for e in exported[start:])
    assert paged_during == exported[start:start + len(paged_during)], "pages read while appending: a prefix"

    mine = [e for e in exported if e["stream_id"] in stream_ids]
    by_prefix = {s: await every_page(auditor, "/v1/events", {"stream_prefix": s}, limit, after=start)
                 for s in stream_ids}
    types = sorted({e["type"] for e in mine})
    chosen = rng.sample(types, k=min(2, len(types)))
    by_type = await every_page(auditor, "/v1/events", {"types": ",".join(chosen)}, limit, after=start)
    assert by_type == [e for e in exported if e["type"] in chosen and e["position"] > start]

    for stream_id, wallet_id in zip(stream_ids, wallets, strict=True):
        events = [e for e in mine if e["stream_id"] == stream_id]
        assert by_prefix[stream_id] == events
        versions = (await auditor.get(f"/v1/streams/{stream_id}/events", {"limit": 1000}))["data"]
        assert versions == events and [e["version"] for e in events] == list(range(1, len(events) + 1))
        await check_states(auditor, wallet_id, events, by_position, head, rng)


async def check_states(auditor: Http, wallet_id: str, events: list[dict[str, Any]],
                       by_position: dict[int, dict[str, Any]], head: int, rng: random.Random) -> None:
    """The state at positions (each of the wallet's, some of others', 1 and the head) and at times (each
    event's recorded_at and a microsecond either side, each reservation's deadline and either side,
    written in several offsets) against the fold."""
    path = f"/v1/wallets/{wallet_id}/state"
    positions = {1, head, *(e["position"] for e in events), *(e["position"] - 1 for e in events)}
    positions |= set(rng.sample(range(1, head + 1), k=min(10, head)))
    for position in sorted(p for p in positions if p >= 1):
        moment = when(by_position[position])
        expected = fold([e for e in events if e["position"] <= position])
        if expected is None:
            await auditor.get(path, {"at_position": position}, status=404)
            continue
        state = await auditor.get(path, {"at_position": position})
        assert datetime.fromisoformat(state["as_of"]) == moment
        assert {k: state[k] for k in expected.view(moment)} == expected.view(moment), (position, state)

    deadlines = [due for e in events if e["type"] == "CreditReserved"
                 for due in [datetime.fromisoformat(e["data"]["expires_at"])]]
    times = {t + d for t in [*(when(e) for e in events), *deadlines] for d in (-ONE_US, timedelta(0), ONE_US)}
    zones = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    for moment in sorted(t for t in times if t <= datetime.now(UTC)):
        expected = fold([e for e in events if when(e) <= moment])
        written = moment.astimezone(rng.choice(zones)).isoformat()
        if expected is None:
            await auditor.get(path, {"as_of": written}, status=404)
            continue
        state = await auditor.get(path, {"as_of": written})
        assert datetime.fromisoformat(state["as_of"]) == moment
        assert {k: state[k] for k in expected.view(moment)} == expected.view(moment), (written, state)
