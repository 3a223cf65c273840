"""Read model "deposits": each deposit's status, address, confirmations and amount.

It keeps each wallet's owner (deposit_wallets) so that reads can check access without another
projection. A batch folds each deposit's events into one inserted row (created in this batch) or
one update (created earlier), whose NULLs mean "unchanged".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from backend.db import Connection
from backend.store.reads import Executor
from projections.base import (
    DEPOSIT,
    WALLET,
    Projection,
    Rows,
    aggregate_id,
    expect_count,
    integer,
)
from projections.checkpoints import with_checkpoint
from projections.events import Event

PENDING, CONFIRMING, CONFIRMED, FAILED, EXPIRED = "pending", "confirming", "confirmed", "failed", "expired"
STATUS_OF = {
    "DepositPending": PENDING,
    "DepositConfirming": CONFIRMING,
    "DepositConfirmed": CONFIRMED,
    "DepositFailed": FAILED,
    "DepositExpired": EXPIRED,
}

WALLETS = Rows(wallet_id="uuid", owner="text")
INSERT_WALLETS_SQL = f"insert into deposit_wallets (wallet_id, owner) select * from {WALLETS.source('$1')} as x"
CREATED = Rows(id="uuid", w="uuid", cur="text", addr="text", s="text", c="int", a="bigint", tx="text", f="text",
               v="int", t0="timestamptz", t="timestamptz")
INSERT_SQL = f"""
insert into deposits (deposit_id, wallet_id, owner, currency, address, status, confirmations, amount, chain_tx_id,
                      failure_reason, version, created_at, updated_at)
select x.id, x.w, dw.owner, x.cur, x.addr, x.s, x.c, x.a, x.tx, x.f, x.v, x.t0, x.t
from {CREATED.source("$1")} as x
left join deposit_wallets dw on dw.wallet_id = x.w
"""
CHANGED = Rows(id="uuid", s="text", c="int", a="bigint", tx="text", f="text", v="int", t="timestamptz")
UPDATE_SQL = f"""
update deposits d
set status = x.s, confirmations = coalesce(x.c, d.confirmations), amount = coalesce(x.a, d.amount),
    chain_tx_id = coalesce(x.tx, d.chain_tx_id), failure_reason = coalesce(x.f, d.failure_reason),
    version = x.v, updated_at = x.t
from {CHANGED.source("$1")} as x
where d.deposit_id = x.id
"""

# Field positions in a folded deposit (see _fold).
_STATUS, _CONFIRMATIONS, _AMOUNT, _TX, _REASON, _VERSION, _UPDATED = range(7)


class Deposits(Projection):
    name = "deposits"
    types = frozenset({"WalletOpened", "DepositCreated", *STATUS_OF})
    tables = ("deposit_wallets", "deposits")

    async def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        wallets: list[tuple[str, str]] = []
        created: dict[str, tuple[str, str, str, Any]] = {}
        changes: dict[str, list[Any]] = {}
        for event in events:
            data = event.data
            if event.type == "WalletOpened":
                wallets.append((aggregate_id(event, WALLET), data["owner"]))
                continue
            deposit = aggregate_id(event, DEPOSIT)
            change = changes.get(deposit)
            if change is None:
                change = changes[deposit] = [PENDING, None, None, None, None, 0, None]
            change[_VERSION] = event.version
            change[_UPDATED] = event.recorded_at
            if event.type == "DepositCreated":
                created[deposit] = (data["wallet_id"], data["currency"], data["address"],
                                    event.recorded_at)
                change[_CONFIRMATIONS] = 0
            else:
                _fold(change, event.type, data)
        if wallets:
            await conn.execute(INSERT_WALLETS_SQL, WALLETS.of(wallets))
        if created:
            rows = []
            for deposit, (wallet, currency, address, created_at) in created.items():
                status, confirmations, amount, tx, reason, version, updated_at = changes.pop(deposit)
                rows.append((deposit, wallet, currency, address, status, confirmations, amount, tx, reason, version,
                             created_at, updated_at))
            await conn.execute(INSERT_SQL, CREATED.of(rows))
        if changes:
            status = await conn.execute(UPDATE_SQL, CHANGED.of((d, *change) for d, change in changes.items()))
            expect_count(status, len(changes), "events for deposits that were never created")


def _fold(change: list[Any], kind: str, data: dict[str, Any]) -> None:
    change[_STATUS] = STATUS_OF[kind]
    if kind in ("DepositPending", "DepositConfirming", "DepositConfirmed"):
        change[_CONFIRMATIONS] = integer(data, "confirmations")
    if kind == "DepositConfirmed":
        change[_AMOUNT] = integer(data, "amount")
        change[_TX] = data["chain_tx_id"]
    elif kind == "DepositFailed":
        change[_REASON] = data["reason"]


# ---------------------------------------------------------------- queries

GET_SQL = with_checkpoint("deposits", "select * from deposits where deposit_id = $1")


def deposit_view(row: Any) -> dict[str, Any]:
    """Exactly the fields of backend.commands.deposits.deposit_body (owner stays inside, for access)."""
    return {
        "deposit_id": str(row["deposit_id"]),
        "wallet_id": str(row["wallet_id"]),
        "currency": row["currency"],
        "address": row["address"],
        "status": row["status"],
        "confirmations": row["confirmations"],
        "amount": row["amount"],
        "chain_tx_id": row["chain_tx_id"],
        "failure_reason": row["failure_reason"],
        "version": row["version"],
    }


async def get_deposit(db: Executor, deposit_id: UUID) -> tuple[int, dict[str, Any] | None]:
    """(checkpoint, the deposit's view plus its wallet's owner, or None)."""
    row = await db.fetchrow(GET_SQL, deposit_id)
    if row is None:
        return 0, None
    if row["deposit_id"] is None:
        return row["checkpoint"], None
    return row["checkpoint"], {**deposit_view(row), "owner": row["owner"]}
