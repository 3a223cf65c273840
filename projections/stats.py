"""Read model "stats": per currency, money credited, debited, settled between wallets, open locked and
reserved, wallets and deposits by status; and how many events of each type the log holds.

credited = WalletCredited + DepositCredited and debited = WalletDebited + the charged part of
ReservationConfirmed, so the balances of a currency always sum to credited - debited. Counters are
updated with deltas; the small side tables (wallet currency, deposit status, open reservations)
are what a delta needs to know about earlier events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from backend.db import Connection
from projections.base import (
    DEPOSIT,
    WALLET,
    MalformedEvent,
    Projection,
    Rows,
    aggregate_id,
    expect_count,
    id_array,
    integer,
)
from projections.checkpoints import with_checkpoint
from projections.deposits import PENDING, STATUS_OF
from projections.events import Event

WALLETS = Rows(wallet_id="uuid", currency="text")
INSERT_WALLETS_SQL = f"insert into stats_wallets (wallet_id, currency) select * from {WALLETS.source('$1')} as x"
# A left join, so a movement on an unknown wallet fails on currency's NOT NULL instead of vanishing.
MONEY = Rows(id="uuid", n="int", c="bigint", d="bigint", s="bigint", l="bigint", r="bigint")
ADD_MONEY_SQL = f"""
insert into stats_currencies as s (currency, wallets, credited, debited, settled, locked, reserved)
select w.currency, sum(x.n), sum(x.c), sum(x.d), sum(x.s), sum(x.l), sum(x.r)
from {MONEY.source("$1")} as x
left join stats_wallets w on w.wallet_id = x.id
group by w.currency
on conflict (currency) do update set
    wallets = s.wallets + excluded.wallets, credited = s.credited + excluded.credited,
    debited = s.debited + excluded.debited, settled = s.settled + excluded.settled,
    locked = s.locked + excluded.locked, reserved = s.reserved + excluded.reserved
"""
RESERVATIONS = Rows(id="uuid", wallet="uuid", a="bigint", e="timestamptz")
INSERT_RESERVATIONS_SQL = f"""
insert into stats_reservations (reservation_id, currency, amount, expires_at)
select x.id, w.currency, x.a, x.e
from {RESERVATIONS.source("$1")} as x
left join stats_wallets w on w.wallet_id = x.wallet
"""
DELETE_RESERVATIONS_SQL = f"delete from stats_reservations where reservation_id = any({id_array('$1')})"
DEPOSIT_STATUS_SQL = f"""
select deposit_id::text, currency, status from stats_deposits where deposit_id = any({id_array("$1")})
"""
DEPOSITS = Rows(deposit_id="uuid", currency="text", status="text")
UPSERT_DEPOSITS_SQL = f"""
insert into stats_deposits (deposit_id, currency, status) select * from {DEPOSITS.source("$1")} as x
on conflict (deposit_id) do update set status = excluded.status
"""
DEPOSIT_COUNTS = Rows(currency="text", status="text", count="bigint")
ADD_DEPOSIT_COUNTS_SQL = f"""
insert into stats_deposit_counts as s (currency, status, count)
select * from {DEPOSIT_COUNTS.source("$1")} as x
on conflict (currency, status) do update set count = s.count + excluded.count
"""
# Zero rows go, so that the table is the same however the log was cut into batches.
DROP_ZERO_COUNTS_SQL = "delete from stats_deposit_counts where count = 0"
EVENT_TYPES = Rows(type="text", count="bigint")
ADD_EVENT_TYPES_SQL = f"""
insert into stats_event_types as s (type, count) select * from {EVENT_TYPES.source("$1")} as x
on conflict (type) do update set count = s.count + excluded.count
"""

# Per event type: where its `amount` goes among (credited, debited, settled, locked, reserved).
_MONEY: dict[str, tuple[int, int, int, int, int]] = {
    "WalletCredited": (1, 0, 0, 0, 0),
    "DepositCredited": (1, 0, 0, 0, 0),
    "WalletDebited": (0, 1, 0, 0, 0),
    "LockSettled": (0, 0, 1, -1, 0),
    "FundsLocked": (0, 0, 0, 1, 0),
    "LockReleased": (0, 0, 0, -1, 0),
    "CreditReserved": (0, 0, 0, 0, 1),
    "ReservationRolledBack": (0, 0, 0, 0, -1),
    "ReservationExpired": (0, 0, 0, 0, -1),
}
_RESERVATION_CLOSED = frozenset({"ReservationConfirmed", "ReservationRolledBack", "ReservationExpired"})
_WALLET_EVENTS = frozenset({"WalletOpened", "ReservationConfirmed", *_MONEY})
_DEPOSIT_EVENTS = frozenset({"DepositCreated", *STATUS_OF})


class Stats(Projection):
    name = "stats"
    types = None  # events by type counts every event, known or not
    tables = ("stats_wallets", "stats_currencies", "stats_reservations", "stats_deposits", "stats_deposit_counts",
              "stats_event_types")

    async def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        batch = _Batch()
        for event in events:
            batch.add(event)
        await batch.write(conn)


@dataclass(slots=True)
class _Batch:
    by_type: Counter[str] = field(default_factory=Counter)
    wallets: list[tuple[str, str]] = field(default_factory=list)
    money: dict[str, list[int]] = field(default_factory=dict)
    """wallet -> [wallets opened, credited, debited, settled, locked, reserved] deltas"""
    opened: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    closed: list[str] = field(default_factory=list)
    deposits: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    """deposit -> (currency if created in this batch, final status)"""

    def add(self, event: Event) -> None:
        kind = event.type
        self.by_type[kind] += 1
        if kind in _WALLET_EVENTS:
            self._wallet(event)
        elif kind in _DEPOSIT_EVENTS:
            self._deposit(event)

    def _wallet(self, event: Event) -> None:
        kind, data = event.type, event.data
        wallet = aggregate_id(event, WALLET)
        row = self.money.get(wallet)
        if row is None:
            row = self.money[wallet] = [0, 0, 0, 0, 0, 0]
        if kind == "WalletOpened":
            self.wallets.append((wallet, data["currency"]))
            row[0] += 1
        elif kind == "ReservationConfirmed":
            row[2] += integer(data, "amount")
            row[5] -= integer(data, "reserved_amount")
        else:
            amount = integer(data, "amount")
            for i, sign in enumerate(_MONEY[kind], start=1):
                row[i] += sign * amount
            if kind == "CreditReserved":
                self.opened[data["reservation_id"]] = (wallet, amount, data["expires_at"])
        if kind in _RESERVATION_CLOSED:
            rid = data["reservation_id"]
            if self.opened.pop(rid, None) is None:
                self.closed.append(rid)

    def _deposit(self, event: Event) -> None:
        deposit = aggregate_id(event, DEPOSIT)
        if event.type == "DepositCreated":
            self.deposits[deposit] = (event.data["currency"], PENDING)
        else:
            currency = self.deposits[deposit][0] if deposit in self.deposits else None
            self.deposits[deposit] = (currency, STATUS_OF[event.type])

    async def write(self, conn: Connection) -> None:
        if self.wallets:
            await conn.execute(INSERT_WALLETS_SQL, WALLETS.of(self.wallets))
        if self.money:
            await conn.execute(ADD_MONEY_SQL, MONEY.of((w, *row) for w, row in self.money.items()))
        if self.closed:
            status = await conn.execute(DELETE_RESERVATIONS_SQL, self.closed)
            expect_count(status, len(self.closed), "a reservation closed that is not open")
        if self.opened:
            await conn.execute(INSERT_RESERVATIONS_SQL, RESERVATIONS.of((r, *row) for r, row in self.opened.items()))
        if self.deposits:
            await self._count_deposits(conn)
        await conn.execute(ADD_EVENT_TYPES_SQL, EVENT_TYPES.of(self.by_type.items()))

    async def _count_deposits(self, conn: Connection) -> None:
        """Move each deposit from its earlier status (read from stats_deposits) to its final one."""
        earlier = [d for d, (currency, _) in self.deposits.items() if currency is None]
        known = {r["deposit_id"]: (r["currency"], r["status"]) for r in
                 await conn.fetch(DEPOSIT_STATUS_SQL, earlier)} if earlier else {}
        counts: Counter[tuple[str, str]] = Counter()
        final: list[tuple[str, str, str]] = []
        for deposit, (created_in, status) in self.deposits.items():
            currency = created_in
            if currency is None:
                if deposit not in known:
                    raise MalformedEvent(f"a status change of deposit {deposit}, which was never created")
                currency, before = known[deposit]
                counts[(currency, before)] -= 1
            counts[(currency, status)] += 1
            final.append((deposit, currency, status))
        await conn.execute(UPSERT_DEPOSITS_SQL, DEPOSITS.of(final))
        changed = [(c, s, n) for (c, s), n in counts.items() if n]
        if changed:
            await conn.execute(ADD_DEPOSIT_COUNTS_SQL, DEPOSIT_COUNTS.of(changed))
        if any(n < 0 for _, _, n in changed):
            await conn.execute(DROP_ZERO_COUNTS_SQL)


# ---------------------------------------------------------------- queries

CURRENCIES_SQL = with_checkpoint("stats", """
    select s.*, coalesce(d.due, 0) as due
    from stats_currencies s
    left join (select currency, sum(amount) as due from stats_reservations where expires_at <= $1 group by currency) d
        using (currency)
""")
DEPOSIT_COUNTS_SQL = "select currency, status, count from stats_deposit_counts"
EVENT_TYPES_SQL = "select type, count from stats_event_types order by type"


async def get_stats(conn: Connection, now: datetime) -> tuple[int, dict[str, Any]]:
    """(checkpoint, stats); a reservation past its deadline no longer counts as reserved. Three
    statements in one repeatable-read transaction, so they describe one instant of the model."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(CURRENCIES_SQL, now)
        deposit_counts = await conn.fetch(DEPOSIT_COUNTS_SQL)
        event_types = await conn.fetch(EVENT_TYPES_SQL)
    checkpoint = rows[0]["checkpoint"] if rows else 0
    currencies: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["currency"] is None:
            continue
        currencies[row["currency"]] = {
            "wallets": row["wallets"],
            "credited": int(row["credited"]),
            "debited": int(row["debited"]),
            "settled": int(row["settled"]),
            "locked": int(row["locked"]),
            "reserved": int(row["reserved"] - row["due"]),
            "deposits": {},
        }
    for row in deposit_counts:
        figures = currencies.setdefault(row["currency"], {"deposits": {}})
        figures["deposits"][row["status"]] = row["count"]
    return checkpoint, {
        "currencies": dict(sorted(currencies.items())),
        "events": {row["type"]: row["count"] for row in event_types},
    }
