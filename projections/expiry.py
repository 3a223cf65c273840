"""Reservation expiry: a process manager that is itself a projection (leader-elected, checkpointed).

It projects the open reservations into expiry_schedule (reservation, wallet, deadline). Whenever
the runner has caught up it calls `tick`, which expires what is due through the CommandBus (the
SYSTEM actor, `wallets.expire`) and tells the runner how long to sleep: until the next deadline,
unless the log moves first. Everything is read through the expires_at index, earliest first.

The runner ticks after every step, dozens of times a second under load, while deadlines are minutes
apart: so the next deadline is remembered, and lowered by every reservation the runner applies, and a
tick before it reads nothing. The memory errs early only (a batch that rolls back, a reservation closed
since: one needless read), and is dropped whenever the runner reloads its checkpoint, because a rebuild
or another leader may have applied events this process never saw.

Idempotent: `expire` of a reservation that is already closed raises ReservationNotOpen, which
means done; the closing event then removes the row when the runner applies it. One command per
wallet is enough, because expiring one due reservation records every due one of that wallet.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from backend.clock import SYSTEM_CLOCK, Clock
from backend.commands import wallets
from backend.commands.bus import CommandBus, Decision
from backend.commands.context import SYSTEM, CommandContext
from backend.db import Connection
from backend.domain.errors import ReservationNotOpen
from backend.domain.registry import wallet_stream
from projections.base import WALLET, Projection, Rows, aggregate_id, id_array
from projections.events import Event

log = logging.getLogger(__name__)

SCHEDULED = Rows(r="uuid", w="uuid", e="timestamptz")
INSERT_SQL = f"""
insert into expiry_schedule (reservation_id, wallet_id, expires_at)
select r, w, e from {SCHEDULED.source("$1")} as x
"""
DELETE_SQL = f"delete from expiry_schedule where reservation_id = any({id_array('$1')})"
DUE_SQL = """
select reservation_id, wallet_id from expiry_schedule where expires_at <= $1 order by expires_at limit $2
"""
NEXT_SQL = "select expires_at from expiry_schedule order by expires_at limit 1"

CLOSING = ("ReservationConfirmed", "ReservationRolledBack", "ReservationExpired")
RETRY_AFTER_S = 5.0
"""A reservation attempted this recently is left alone (until its closing event arrives)."""
RECHECK_S = 1.0


class Expiry(Projection):
    name = "expiry"
    types = frozenset({"CreditReserved", *CLOSING})
    tables = ("expiry_schedule",)

    def __init__(self, bus: CommandBus | None = None, *, batch_size: int = 100, clock: Clock = SYSTEM_CLOCK) -> None:
        self.bus = bus
        """None: only project the schedule (rebuilds, status), never issue commands."""
        self.batch_size = batch_size
        self.clock = clock
        """What is due is due by this clock, and expired at its time (the command's now)."""
        self.expired = 0
        self._attempted: dict[UUID, datetime] = {}
        self._next_due: datetime | None = None
        self._next_due_known = False
        """Whether _next_due (None: nothing scheduled) is the earliest deadline in expiry_schedule, or earlier."""

    def resume(self) -> None:
        self._next_due_known = False

    async def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        opened: dict[str, tuple[str, str]] = {}
        closed: list[str] = []
        for event in events:
            data = event.data
            rid = data["reservation_id"]
            if event.type == "CreditReserved":
                opened[rid] = (aggregate_id(event, WALLET), data["expires_at"])
                self._scheduled(data["expires_at"])
            elif opened.pop(rid, None) is None:
                closed.append(rid)
        if closed:
            await conn.execute(DELETE_SQL, closed)
        if opened:
            await conn.execute(INSERT_SQL, SCHEDULED.of((r, *row) for r, row in opened.items()))

    def _scheduled(self, expires_at: str) -> None:
        """A reservation applied: remember its deadline if it is the earliest (or forget the earliest,
        for a deadline that does not compare; the schedule's own cast judges it)."""
        try:
            due: datetime | None = datetime.fromisoformat(expires_at)
        except (TypeError, ValueError):
            due = None
        if due is None or due.tzinfo is None:
            self._next_due_known = False
        elif self._next_due_known and (self._next_due is None or due < self._next_due):
            self._next_due = due

    async def tick(self, conn: Connection) -> float | None:
        if self.bus is None:
            return None
        now = self.clock.now()
        if self._next_due_known:
            if self._next_due is None:
                return None
            if now < self._next_due:
                return (self._next_due - now).total_seconds()
        self._next_due_known = False
        due = await conn.fetch(DUE_SQL, now, self.batch_size)
        issued = await self._expire(due)
        if issued:
            return 0.0  # catch up with the events just recorded, then look again
        upcoming: datetime | None = await conn.fetchval(NEXT_SQL)
        if upcoming is None:
            self._next_due, self._next_due_known = None, True
            return None
        if upcoming <= now:  # due, but attempted a moment ago: wait for its closing event
            return RECHECK_S
        self._next_due, self._next_due_known = upcoming, True
        return (upcoming - self.clock.now()).total_seconds()

    async def _expire(self, due: Sequence[asyncpg.Record]) -> int:
        """Issue one expire per wallet with a due reservation; return how many were issued."""
        assert self.bus is not None
        clock = self.clock.now()
        self._attempted = {r: t for r, t in self._attempted.items()
                           if timedelta(0) <= clock - t < timedelta(seconds=RETRY_AFTER_S)}
        seen: set[UUID] = set()
        issued = 0
        for row in due:
            reservation_id: UUID = row["reservation_id"]
            wallet_id: UUID = row["wallet_id"]
            if wallet_id in seen or reservation_id in self._attempted:
                continue
            seen.add(wallet_id)
            self._attempted[reservation_id] = clock
            issued += 1
            await self._expire_one(wallet_id, reservation_id)
        return issued

    async def _expire_one(self, wallet_id: UUID, reservation_id: UUID) -> None:
        assert self.bus is not None
        repo = self.bus.repository

        async def decide(ctx: CommandContext) -> Decision:
            return await wallets.expire(repo, ctx, wallet_id, reservation_id)

        ctx = CommandContext(SYSTEM, correlation_id=f"expiry-{reservation_id}", now=self.clock.now())
        try:
            await self.bus.execute(ctx, [wallet_stream(wallet_id)], decide)
        except ReservationNotOpen:
            return  # closed meanwhile (confirmed, rolled back, or expired by another command): done
        self.expired += 1
