"""The expected read models, folded from the log one event at a time in plain Python (an independent
implementation of what the set-based projections compute), checked against the domain aggregates,
and compared with the tables row by row."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from backend.domain import ApiKey, Deposit, Wallet
from backend.store.event_codec import fold
from backend.store.event_store import EventStore
from backend.store.events import RecordedEvent

Rows = dict[Any, tuple[Any, ...]]


def _t(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


class Oracle:
    def __init__(self) -> None:
        self.wallets: dict[UUID, dict[str, Any]] = {}
        self.locks: dict[UUID, tuple[Any, ...]] = {}
        self.open_reservations: dict[UUID, tuple[Any, ...]] = {}
        self.reservations: dict[UUID, dict[str, Any]] = {}
        self.deposits: dict[UUID, dict[str, Any]] = {}
        self.keys: dict[UUID, dict[str, Any]] = {}
        self.currencies: dict[str, Counter[str]] = {}
        self.deposit_counts: Counter[tuple[str, str]] = Counter()
        self.event_types: Counter[str] = Counter()

    def fold(self, events: Sequence[RecordedEvent]) -> Oracle:
        for event in events:
            self.event_types[event.type] += 1
            category, _, rest = event.stream_id.partition("-")
            handler = {"wallet": self._wallet, "deposit": self._deposit, "apikey": self._key}.get(category)
            if handler is not None:
                handler(UUID(rest), event)
        return self

    def _money(self, wallet_id: UUID) -> Counter[str]:
        return self.currencies.setdefault(self.wallets[wallet_id]["currency"], Counter())

    def _wallet(self, wallet_id: UUID, event: RecordedEvent) -> None:
        d, kind = event.data, event.type
        if kind == "WalletOpened":
            self.wallets[wallet_id] = {"owner": d["owner"], "currency": d["currency"], "balance": 0, "locked": 0,
                                       "reserved": 0}
            self._money(wallet_id)["wallets"] += 1
        w, money = self.wallets[wallet_id], self._money(wallet_id)
        w["version"] = event.version
        if kind in ("WalletCredited", "DepositCredited"):
            w["balance"] += d["amount"]
            money["credited"] += d["amount"]
        elif kind == "WalletDebited":
            w["balance"] -= d["amount"]
            money["debited"] += d["amount"]
        elif kind == "SettlementReceived":
            w["balance"] += d["amount"]
        elif kind == "FundsLocked":
            w["locked"] += d["amount"]
            money["locked"] += d["amount"]
            self.locks[UUID(d["lock_id"])] = (wallet_id, d["amount"], d["reason"])
        elif kind in ("LockReleased", "LockSettled"):
            w["locked"] -= d["amount"]
            money["locked"] -= d["amount"]
            del self.locks[UUID(d["lock_id"])]
            if kind == "LockSettled":
                w["balance"] -= d["amount"]
                money["settled"] += d["amount"]
        elif kind == "CreditReserved":
            rid, expires = UUID(d["reservation_id"]), _t(d["expires_at"])
            w["reserved"] += d["amount"]
            money["reserved"] += d["amount"]
            self.open_reservations[rid] = (wallet_id, d["amount"], expires)
            self.reservations[rid] = {"wallet_id": wallet_id, "owner": w["owner"], "currency": w["currency"],
                                      "amount": d["amount"], "status": "open", "confirmed_amount": None,
                                      "expires_at": expires}
        elif kind in ("ReservationConfirmed", "ReservationRolledBack", "ReservationExpired"):
            rid = UUID(d["reservation_id"])
            held = d["reserved_amount"] if kind == "ReservationConfirmed" else d["amount"]
            w["reserved"] -= held
            money["reserved"] -= held
            del self.open_reservations[rid]
            status = {"ReservationConfirmed": "confirmed", "ReservationRolledBack": "rolled_back"}.get(kind, "expired")
            self.reservations[rid].update(status=status)
            if kind == "ReservationConfirmed":
                w["balance"] -= d["amount"]
                money["debited"] += d["amount"]
                self.reservations[rid]["confirmed_amount"] = d["amount"]

    def _deposit(self, deposit_id: UUID, event: RecordedEvent) -> None:
        d, kind = event.data, event.type
        if kind == "DepositCreated":
            wallet = self.wallets[UUID(d["wallet_id"])]
            self.deposits[deposit_id] = {"wallet_id": UUID(d["wallet_id"]), "owner": wallet["owner"],
                                         "currency": d["currency"], "address": d["address"], "status": "pending",
                                         "confirmations": 0, "amount": None, "chain_tx_id": None,
                                         "failure_reason": None}
        else:
            dep = self.deposits[deposit_id]
            self.deposit_counts[(dep["currency"], dep["status"])] -= 1
            dep["status"] = kind.removeprefix("Deposit").lower()
            dep["confirmations"] = d.get("confirmations", dep["confirmations"])
            dep["amount"] = d.get("amount", dep["amount"])
            dep["chain_tx_id"] = d.get("chain_tx_id", dep["chain_tx_id"])
            dep["failure_reason"] = d.get("reason", dep["failure_reason"])
        dep = self.deposits[deposit_id]
        dep["version"] = event.version
        self.deposit_counts[(dep["currency"], dep["status"])] += 1

    def _key(self, key_id: UUID, event: RecordedEvent) -> None:
        d = event.data
        if event.type == "ApiKeyCreated":
            self.keys[key_id] = {"owner": d["owner"], "name": d["name"], "scopes": sorted(d["scopes"]),
                                 "secret_hash": d["secret_hash"], "expires_at": _t(d["expires_at"]),
                                 "revoked": False, "created_at": _t(d["occurred_at"]), "revoked_at": None}
        else:
            self.keys[key_id].update(revoked=True, revoked_at=_t(d["occurred_at"]))
        self.keys[key_id]["version"] = event.version

    # ------------------------------------------------------------------ expected tables

    def tables(self) -> dict[str, Rows]:
        w = self.wallets
        return {
            "wallet_balances": {k: (v["owner"], v["currency"], v["balance"], v["locked"], v["reserved"], v["version"])
                                for k, v in w.items()},
            "wallet_locks": dict(self.locks),
            "wallet_reservations": dict(self.open_reservations),
            "reservations": {k: tuple(v.values()) for k, v in self.reservations.items()},
            "deposits": {k: tuple(v.values()) for k, v in self.deposits.items()},
            "api_keys": {k: tuple(v.values()) for k, v in self.keys.items()},
            "stats_currencies": {c: tuple(m[f] for f in ("wallets", "credited", "debited", "settled", "locked",
                                                         "reserved")) for c, m in self.currencies.items()},
            "stats_deposit_counts": {k: (n,) for k, n in self.deposit_counts.items() if n},
            "stats_event_types": {k: (n,) for k, n in self.event_types.items()},
            "expiry_schedule": {k: (v[0], v[2]) for k, v in self.open_reservations.items()},
        }


# The same columns, in the same order, read back from the read models.
ACTUAL_SQL = {
    "wallet_balances": "select wallet_id, owner, currency, balance, locked, reserved, version from wallet_balances",
    "wallet_locks": "select lock_id, wallet_id, amount, reason from wallet_locks",
    "wallet_reservations": "select reservation_id, wallet_id, amount, expires_at from wallet_reservations",
    "reservations": "select reservation_id, wallet_id, owner, currency, amount, status, confirmed_amount, expires_at"
                    " from reservations",
    "deposits": "select deposit_id, wallet_id, owner, currency, address, status, confirmations, amount, chain_tx_id,"
                " failure_reason, version from deposits",
    "api_keys": "select key_id, owner, name, (select array_agg(s order by s) from unnest(scopes) s), secret_hash,"
                " expires_at, revoked, created_at, revoked_at, version from api_keys",
    "stats_currencies": "select currency, wallets, credited, debited, settled, locked, reserved from stats_currencies",
    "stats_deposit_counts": "select (currency, status), count from stats_deposit_counts",
    "stats_event_types": "select type, count from stats_event_types",
    "expiry_schedule": "select reservation_id, wallet_id, expires_at from expiry_schedule",
}


async def actual_tables(pool: asyncpg.Pool) -> dict[str, Rows]:
    found: dict[str, Rows] = {}
    for table, sql in ACTUAL_SQL.items():
        rows = await pool.fetch(sql)
        found[table] = {_key(row[0]): tuple(_plain(v) for v in list(row.values())[1:]) for row in rows}
    return found


def _key(value: Any) -> Any:
    return tuple(value) if isinstance(value, asyncpg.Record) else value


def _plain(value: Any) -> Any:
    """numeric sums come back as Decimal: compare them as the integers they are."""
    return int(value) if type(value).__name__ == "Decimal" else value


async def expected_tables(store: EventStore) -> dict[str, Rows]:
    events = [e async for e in store.iter_all()]
    oracle = Oracle().fold(events)
    await check_against_aggregates(store, oracle)
    return oracle.tables()


async def check_against_aggregates(store: EventStore, oracle: Oracle) -> None:
    """The Python fold agrees with the domain's own aggregates (replayed from their streams)."""
    for wallet_id, expected in oracle.wallets.items():
        wallet = fold(await store.read_stream(f"wallet-{wallet_id}"), None, wallet_id)
        assert isinstance(wallet, Wallet)
        got = (wallet.balance, wallet.locked, wallet.reserved, wallet.version)
        assert got == (expected["balance"], expected["locked"], expected["reserved"], expected["version"])
        assert set(wallet.locks) == {k for k, v in oracle.locks.items() if v[0] == wallet_id}
        assert set(wallet.reservations) == {k for k, v in oracle.open_reservations.items() if v[0] == wallet_id}
    for deposit_id, dep in oracle.deposits.items():
        deposit = fold(await store.read_stream(f"deposit-{deposit_id}"), None, deposit_id)
        assert isinstance(deposit, Deposit)
        assert (deposit.status, deposit.confirmations, deposit.amount, deposit.version) == \
            (dep["status"], dep["confirmations"], dep["amount"], dep["version"])
    for key_id, key in oracle.keys.items():
        aggregate = fold(await store.read_stream(f"apikey-{key_id}"), None, key_id)
        assert isinstance(aggregate, ApiKey)
        assert (aggregate.revoked, sorted(aggregate.scopes), aggregate.owner) == \
            (key["revoked"], key["scopes"], key["owner"])


def assert_same(actual: dict[str, Rows], expected: dict[str, Rows]) -> None:
    for table, rows in expected.items():
        got = actual[table]
        missing = rows.keys() - got.keys()
        extra = got.keys() - rows.keys()
        wrong = {k: (got[k], rows[k]) for k in rows.keys() & got.keys() if got[k] != rows[k]}
        assert not (missing or extra or wrong), (
            f"{table}: missing {sorted(map(str, missing))[:5]}, extra {sorted(map(str, extra))[:5]}, "
            f"wrong (actual, expected) {list(wrong.items())[:3]}")
