"""Read model "reservations": every reservation, its amounts, deadline and outcome.

It also keeps each wallet's owner and currency (reservation_wallets), so a reservation carries them
without depending on another projection being up to date. A read reports an open reservation past
its expires_at as expired, before the expiry process has recorded it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from backend.db import Connection
from backend.store.reads import Executor
from projections.base import WALLET, Projection, Rows, aggregate_id, expect_count, integer
from projections.checkpoints import with_checkpoint
from projections.events import Event

OPEN, CONFIRMED, ROLLED_BACK, EXPIRED = "open", "confirmed", "rolled_back", "expired"
CLOSING = {"ReservationConfirmed": CONFIRMED, "ReservationRolledBack": ROLLED_BACK, "ReservationExpired": EXPIRED}

WALLETS = Rows(wallet_id="uuid", owner="text", currency="text")
INSERT_WALLETS_SQL = f"""
insert into reservation_wallets (wallet_id, owner, currency)
select * from {WALLETS.source("$1")} as x
"""
# A left join: a reservation on an unknown wallet fails on owner's NOT NULL instead of vanishing.
OPENED = Rows(r="uuid", w="uuid", a="bigint", e="timestamptz", t="timestamptz")
INSERT_SQL = f"""
insert into reservations (reservation_id, wallet_id, owner, currency, amount, status, expires_at, created_at)
select x.r, x.w, rw.owner, rw.currency, x.a, 'open', x.e, x.t
from {OPENED.source("$1")} as x
left join reservation_wallets rw on rw.wallet_id = x.w
"""
CLOSED = Rows(id="uuid", s="text", c="bigint", t="timestamptz")
CLOSE_SQL = f"""
update reservations r set status = x.s, confirmed_amount = x.c, closed_at = x.t
from {CLOSED.source("$1")} as x
where r.reservation_id = x.id and r.status = 'open'
"""


class Reservations(Projection):
    name = "reservations"
    types = frozenset({"WalletOpened", "CreditReserved", *CLOSING})
    tables = ("reservation_wallets", "reservations")

    async def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        wallets: list[tuple[str, str, str]] = []
        opened: list[tuple[str, str, int, str, str]] = []
        closed: dict[str, tuple[str, int | None, str]] = {}
        for event in events:
            data = event.data
            kind = event.type
            if kind == "WalletOpened":
                wallets.append((aggregate_id(event, WALLET), data["owner"], data["currency"]))
            elif kind == "CreditReserved":
                opened.append((data["reservation_id"], aggregate_id(event, WALLET), integer(data, "amount"),
                               data["expires_at"], data["occurred_at"]))
            else:
                charged = integer(data, "amount") if kind == "ReservationConfirmed" else None
                closed[data["reservation_id"]] = (CLOSING[kind], charged, data["occurred_at"])
        if wallets:
            await conn.execute(INSERT_WALLETS_SQL, WALLETS.of(wallets))
        if opened:
            await conn.execute(INSERT_SQL, OPENED.of(opened))
        if closed:
            status = await conn.execute(CLOSE_SQL, CLOSED.of((r, *row) for r, row in closed.items()))
            expect_count(status, len(closed), "a reservation closed that is not open")


# ---------------------------------------------------------------- queries

GET_SQL = with_checkpoint("reservations", "select * from reservations where reservation_id = $1")


def reservation_view(row: Any, now: datetime) -> dict[str, Any]:
    status = row["status"]
    if status == OPEN and row["expires_at"] <= now:
        status = EXPIRED
    closed_at = row["closed_at"] or (row["expires_at"] if status == EXPIRED else None)
    return {
        "reservation_id": str(row["reservation_id"]),
        "wallet_id": str(row["wallet_id"]),
        "owner": row["owner"],
        "currency": row["currency"],
        "amount": row["amount"],
        "status": status,
        "confirmed_amount": row["confirmed_amount"],
        "expires_at": row["expires_at"].isoformat(),
        "created_at": row["created_at"].isoformat(),
        "closed_at": closed_at.isoformat() if closed_at else None,
    }


async def get_reservation(
    db: Executor, reservation_id: UUID, now: datetime
) -> tuple[int, dict[str, Any] | None]:
    row = await db.fetchrow(GET_SQL, reservation_id)
    if row is None:
        return 0, None
    if row["reservation_id"] is None:
        return row["checkpoint"], None
    return row["checkpoint"], reservation_view(row, now)
