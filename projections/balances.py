"""Read model "balances": each wallet's balance, locked, reserved and version, its open locks and its
open reservations.

A batch is folded in Python into one change per wallet (sums of deltas, the last version) and one
net change per lock and reservation (opened and closed in the same batch: nothing to write), then
written with at most five statements. Reads compute the figures as of now: a reservation past its
expires_at no longer counts as reserved, even before the expiry process records it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from backend.db import Connection
from backend.store.reads import Executor
from projections.base import WALLET, Projection, Rows, aggregate_id, expect_count, id_array, integer
from projections.checkpoints import with_checkpoint
from projections.events import Event

OPENED = Rows(w="uuid", o="text", c="text", t="timestamptz")
INSERT_WALLETS_SQL = f"""
insert into wallet_balances (wallet_id, owner, currency, version, opened_at, updated_at)
select w, o, c, 0, t, t from {OPENED.source("$1")} as x
"""
CHANGES = Rows(wallet_id="uuid", balance="bigint", locked="bigint", reserved="bigint", version="int",
               updated_at="timestamptz")
UPDATE_WALLETS_SQL = f"""
update wallet_balances b
set balance = b.balance + x.balance, locked = b.locked + x.locked, reserved = b.reserved + x.reserved,
    version = x.version, updated_at = x.updated_at
from {CHANGES.source("$1")} as x
where b.wallet_id = x.wallet_id
"""
LOCKS = Rows(lock_id="uuid", wallet_id="uuid", amount="bigint", reason="text", locked_at="timestamptz")
INSERT_LOCKS_SQL = f"""
insert into wallet_locks (lock_id, wallet_id, amount, reason, locked_at)
select * from {LOCKS.source("$1")} as x
"""
DELETE_LOCKS_SQL = f"delete from wallet_locks where lock_id = any({id_array('$1')})"
RESERVATIONS = Rows(r="uuid", w="uuid", a="bigint", e="timestamptz", t="timestamptz")
INSERT_RESERVATIONS_SQL = f"""
insert into wallet_reservations (reservation_id, wallet_id, amount, expires_at, reserved_at)
select r, w, a, e, t from {RESERVATIONS.source("$1")} as x
"""
DELETE_RESERVATIONS_SQL = f"delete from wallet_reservations where reservation_id = any({id_array('$1')})"

# How each event's `amount` moves (balance, locked, reserved); ReservationConfirmed has two amounts.
_DELTAS: dict[str, tuple[int, int, int]] = {
    "WalletCredited": (1, 0, 0),
    "WalletDebited": (-1, 0, 0),
    "DepositCredited": (1, 0, 0),
    "SettlementReceived": (1, 0, 0),
    "FundsLocked": (0, 1, 0),
    "LockReleased": (0, -1, 0),
    "LockSettled": (-1, -1, 0),
    "CreditReserved": (0, 0, 1),
    "ReservationRolledBack": (0, 0, -1),
    "ReservationExpired": (0, 0, -1),
}


@dataclass(slots=True)
class _WalletChange:
    balance: int = 0
    locked: int = 0
    reserved: int = 0
    version: int = 0
    updated_at: datetime | None = None


@dataclass(slots=True)
class _Batch:
    opened: dict[str, tuple[str, str, datetime]] = field(default_factory=dict)
    wallets: dict[str, _WalletChange] = field(default_factory=dict)
    new_locks: dict[str, tuple[str, int, str, datetime]] = field(default_factory=dict)
    closed_locks: list[str] = field(default_factory=list)
    new_reservations: dict[str, tuple[str, int, str, datetime]] = field(default_factory=dict)
    closed_reservations: list[str] = field(default_factory=list)

    def add(self, event: Event) -> None:
        kind = event.type
        data = event.data
        wallet = aggregate_id(event, WALLET)
        change = self.wallets.get(wallet)
        if change is None:
            change = self.wallets[wallet] = _WalletChange()
        change.version = event.version
        change.updated_at = event.recorded_at
        signs = _DELTAS.get(kind)
        if signs is not None:
            amount = integer(data, "amount")
            change.balance += signs[0] * amount
            change.locked += signs[1] * amount
            change.reserved += signs[2] * amount
        if kind == "WalletOpened":
            self.opened[wallet] = (data["owner"], data["currency"], event.recorded_at)
        elif kind == "FundsLocked":
            self.new_locks[data["lock_id"]] = (wallet, integer(data, "amount"), data["reason"],
                                                     event.recorded_at)
        elif kind in ("LockReleased", "LockSettled"):
            self._close(self.new_locks, self.closed_locks, data["lock_id"])
        elif kind == "CreditReserved":
            self.new_reservations[data["reservation_id"]] = (
                wallet, integer(data, "amount"), data["expires_at"], event.recorded_at)
        elif kind == "ReservationConfirmed":
            change.balance -= integer(data, "amount")
            change.reserved -= integer(data, "reserved_amount")
            self._close(self.new_reservations, self.closed_reservations, data["reservation_id"])
        elif kind in ("ReservationRolledBack", "ReservationExpired"):
            self._close(self.new_reservations, self.closed_reservations, data["reservation_id"])

    @staticmethod
    def _close(opened: dict[str, Any], closed: list[str], key: str) -> None:
        if opened.pop(key, None) is None:
            closed.append(key)

    async def write(self, conn: Connection) -> None:
        if self.opened:
            await conn.execute(INSERT_WALLETS_SQL, OPENED.of((w, *row) for w, row in self.opened.items()))
        updated = await conn.execute(UPDATE_WALLETS_SQL, CHANGES.of(
            (w, c.balance, c.locked, c.reserved, c.version, c.updated_at) for w, c in self.wallets.items()))
        expect_count(updated, len(self.wallets), "events for wallets that were never opened")
        if self.closed_locks:
            deleted = await conn.execute(DELETE_LOCKS_SQL, self.closed_locks)
            expect_count(deleted, len(self.closed_locks), "a lock closed that is not open")
        if self.new_locks:
            await conn.execute(INSERT_LOCKS_SQL, LOCKS.of((k, *row) for k, row in self.new_locks.items()))
        if self.closed_reservations:
            deleted = await conn.execute(DELETE_RESERVATIONS_SQL, self.closed_reservations)
            expect_count(deleted, len(self.closed_reservations), "a reservation closed that is not open")
        if self.new_reservations:
            await conn.execute(INSERT_RESERVATIONS_SQL,
                               RESERVATIONS.of((r, *row) for r, row in self.new_reservations.items()))


class Balances(Projection):
    name = "balances"
    types = frozenset({"WalletOpened", "ReservationConfirmed", *_DELTAS})
    tables = ("wallet_balances", "wallet_locks", "wallet_reservations")

    async def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        batch = _Batch()
        for event in events:
            batch.add(event)
        await batch.write(conn)


# ---------------------------------------------------------------- queries

_WALLET_COLUMNS = """
    w.wallet_id, w.owner, w.currency, w.balance, w.locked, w.reserved, w.version,
    coalesce((select sum(r.amount) from wallet_reservations r
              where r.wallet_id = w.wallet_id and r.expires_at <= $1), 0)::bigint as due
"""
WALLET_SQL = with_checkpoint("balances", f"""
    select {_WALLET_COLUMNS},
        (select array_agg((l.lock_id, l.amount, l.reason, l.locked_at) order by l.locked_at, l.lock_id)
         from wallet_locks l where l.wallet_id = w.wallet_id) as locks,
        (select array_agg((r.reservation_id, r.amount, r.expires_at, r.reserved_at)
                          order by r.expires_at, r.reservation_id)
         from wallet_reservations r where r.wallet_id = w.wallet_id and r.expires_at > $1) as reservations
    from wallet_balances w where w.wallet_id = $2
""")
LIST_BY_OWNER_SQL = with_checkpoint("balances", f"""
    select {_WALLET_COLUMNS} from wallet_balances w
    where w.owner = $2 and w.wallet_id > $3 order by w.wallet_id limit $4
""")
LIST_ALL_SQL = with_checkpoint("balances", f"""
    select {_WALLET_COLUMNS} from wallet_balances w
    where w.wallet_id > $2 order by w.wallet_id limit $3
""")
MIN_UUID = UUID(int=0)


def wallet_view(row: Any) -> dict[str, Any]:
    """The wallet as the API shows it, with due reservations counted as expired."""
    reserved = row["reserved"] - row["due"]
    return {
        "wallet_id": str(row["wallet_id"]),
        "owner": row["owner"],
        "currency": row["currency"],
        "balance": row["balance"],
        "available": row["balance"] - row["locked"] - reserved,
        "locked": row["locked"],
        "reserved": reserved,
        "version": row["version"],
    }


async def get_wallet(db: Executor, wallet_id: UUID, now: datetime) -> tuple[int, dict[str, Any] | None]:
    """(checkpoint, wallet with its open locks and reservations, or None). The wallet also carries `due`:
    how much it holds in reservations past their deadline whose expiry the log has not recorded yet
    (counted as expired in its figures, which then depend on `now` as well as on its version)."""
    row = await db.fetchrow(WALLET_SQL, now, wallet_id)
    if row is None:
        return 0, None
    if row["wallet_id"] is None:
        return row["checkpoint"], None
    wallet = wallet_view(row)
    wallet["due"] = row["due"]
    wallet["locks"] = [
        {"lock_id": str(lock_id), "amount": amount, "reason": reason, "locked_at": at.isoformat()}
        for lock_id, amount, reason, at in row["locks"] or ()
    ]
    wallet["reservations"] = [
        {"reservation_id": str(rid), "amount": amount, "expires_at": expires.isoformat(), "reserved_at": at.isoformat()}
        for rid, amount, expires, at in row["reservations"] or ()
    ]
    return row["checkpoint"], wallet


async def list_wallets(
    db: Executor, owner: str | None, after: UUID | None, limit: int, now: datetime
) -> tuple[int, list[dict[str, Any]]]:
    """(checkpoint, up to limit wallets after the cursor in wallet_id order), of one owner or of all."""
    if owner is None:
        rows = await db.fetch(LIST_ALL_SQL, now, after or MIN_UUID, limit)
    else:
        rows = await db.fetch(LIST_BY_OWNER_SQL, now, owner, after or MIN_UUID, limit)
    checkpoint = rows[0]["checkpoint"] if rows else 0
    return checkpoint, [wallet_view(row) for row in rows if row["wallet_id"] is not None]
