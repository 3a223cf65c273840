"""Reservation expiry: recorded within a second of the deadline, once per reservation, by one leader,
and never for a reservation that closed first. Time is a ManualClock the tests move (never a sleep):
nothing expires while it stands before a deadline, and each expiry happens at the clock's time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from uuid import UUID, uuid4

import pytest

from backend.clock import ManualClock
from backend.commands import wallets
from backend.commands.context import SYSTEM, CommandContext
from backend.domain.registry import wallet_stream
from projections.events import read_batch
from projections.expiry import Expiry
from tests.integration.projections.harness import Node
from tests.support import eventually


@pytest.fixture
async def node(own_database_url: str) -> AsyncIterator[Node]:
    """One process's core and (not yet started) runners, on a clock that moves only when told."""
    opened = await Node.open(own_database_url, clock=ManualClock())
    try:
        yield opened
    finally:
        await opened.close()


def clock_of(node: Node) -> ManualClock:
    assert isinstance(node.clock, ManualClock)
    return node.clock


async def command(node: Node, wallet_id: UUID, decide) -> int:  # type: ignore[no-untyped-def]
    ctx = CommandContext(SYSTEM, now=node.clock.now())
    reply = await node.bus.execute(ctx, [wallet_stream(wallet_id)], decide)
    return reply.position


async def funded_wallet(node: Node, amount: int = 10_000) -> UUID:
    wallet_id, repo = uuid4(), node.bus.repository
    await command(node, wallet_id, lambda ctx: wallets.open_wallet(repo, ctx, wallet_id, "alice", "USD"))
    await command(node, wallet_id, lambda ctx: wallets.credit(repo, ctx, wallet_id, amount, "seed", None))
    return wallet_id


async def reserve(node: Node, wallet_id: UUID, ttl_seconds: int) -> UUID:
    reservation_id, repo = uuid4(), node.bus.repository
    await command(node, wallet_id, lambda ctx: wallets.reserve(repo, ctx, wallet_id, 10, ttl_seconds, None,
                                                                 reservation_id))
    return reservation_id


async def expiries(node: Node) -> dict[str, list[tuple[datetime, datetime]]]:
    """reservation id -> [(expired at, expires_at)] of its ReservationExpired events; "expired at" is
    the expiring command's now (the event's occurred_at), on the clock the process manager was given."""
    found: dict[str, list[tuple[datetime, datetime]]] = {}
    async for event in node.store.iter_all(types=["ReservationExpired"]):
        found.setdefault(event.data["reservation_id"], []).append(
            (datetime.fromisoformat(event.data["occurred_at"]), datetime.fromisoformat(event.data["expires_at"])))
    return found


async def test_a_one_second_reservation_expires_within_a_second_of_its_deadline(node: Node) -> None:
    await node.start()
    wallet_id = await funded_wallet(node)
    reservation_id = str(await reserve(node, wallet_id, ttl_seconds=1))
    await eventually(node.caught_up, what="the runners, the expiry schedule included")
    clock_of(node).advance(0.5)
    await eventually(node.caught_up)
    assert reservation_id not in await expiries(node)  # not due yet, whatever the real time says

    async def expired() -> bool:
        return reservation_id in await expiries(node)

    clock_of(node).advance(0.5)  # the deadline, exactly
    await eventually(expired, timeout=10, what="the reservation's ReservationExpired event")
    [(expired_at, expires_at)] = (await expiries(node))[reservation_id]
    assert expired_at == clock_of(node).now()
    assert timedelta(0) <= expired_at - expires_at <= timedelta(seconds=1)


async def test_many_reservations_expire_once_each_with_two_processes_running_expiry(own_database_url: str) -> None:
    clock = ManualClock()  # one time for both processes
    first, second = await Node.open(own_database_url, clock=clock), await Node.open(own_database_url, clock=clock)
    try:
        await first.start()
        await second.start()
        wallet_ids = [await funded_wallet(first) for _ in range(4)]
        due = [str(await reserve(first, wallet_ids[i % 4], ttl_seconds=1)) for i in range(12)]
        kept = await reserve(first, wallet_ids[0], ttl_seconds=3600)
        confirmed = await reserve(first, wallet_ids[1], ttl_seconds=1)
        repo = first.bus.repository
        await command(first, wallet_ids[1],
                      lambda ctx: wallets.confirm(repo, ctx, wallet_ids[1], confirmed, None, None))

        async def all_expired() -> bool:
            return set(due) <= set(await expiries(first))

        await eventually(first.caught_up)
        assert not await expiries(first)
        clock.advance(1)
        await eventually(all_expired, timeout=15, what="every due reservation to expire")
        found = await expiries(first)
        assert all(len(found[r]) == 1 for r in due)
        assert str(kept) not in found and str(confirmed) not in found
        for [(expired_at, expires_at)] in (found[r] for r in due):
            assert timedelta(0) <= expired_at - expires_at <= timedelta(seconds=1)
        await eventually(first.caught_up)
        assert await first.pool.fetchval("select count(*) from expiry_schedule") == 1
    finally:
        await first.close()
        await second.close()


async def test_ticks_read_the_schedule_only_when_a_deadline_may_be_due_and_after_a_reload(node: Node) -> None:
    """The process manager remembers the next deadline instead of reading the schedule on every tick;
    what it remembers is lowered by the reservations it applies, and dropped when the runner reloads its
    checkpoint (here: another instance, as a rebuild would, applied a reservation this one never saw)."""
    expiry = Expiry(node.bus, clock=node.clock)
    wallet_id = await funded_wallet(node)
    async with node.pool.acquire() as conn:
        assert await expiry.tick(conn) is None  # nothing scheduled, and now it knows
        reservation_id = str(await reserve(node, wallet_id, ttl_seconds=1))
        events = await read_batch(conn, 0, 100, sorted(Expiry.types))
        async with conn.transaction():
            await Expiry(None).apply(conn, events)  # applied elsewhere: this instance never saw it

        clock_of(node).advance(1)  # the deadline
        assert await conn.fetchval("select count(*) from expiry_schedule where expires_at <= $1", node.clock.now())
        assert await expiry.tick(conn) is None and reservation_id not in await expiries(node)  # read nothing
        expiry.resume()
        assert await expiry.tick(conn) == 0.0  # read the schedule, expired what was due
        assert reservation_id in await expiries(node)

        await expiry.apply(conn, await read_batch(conn, 0, 100, ["ReservationExpired"]))
        assert await expiry.tick(conn) is None  # the schedule is empty again
        # an hour: not due while the suite runs (it would append to the log that later tests read)
        later = str(await reserve(node, wallet_id, ttl_seconds=3600))
        reserved = [e for e in await read_batch(conn, 0, 100, ["CreditReserved"]) if e.data["reservation_id"] == later]
        async with conn.transaction():
            await expiry.apply(conn, reserved)
        remaining = await expiry.tick(conn)  # lowered by the reservation it applied, without a read
        assert remaining is not None and 3595 < remaining <= 3600
