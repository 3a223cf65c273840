"""Every read model equals a fold of the log, row by row: followed live, and caught up from behind in
batches of several sizes (so one batch opens and closes the same lock or reservation)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from backend.commands import wallets
from projections import balances, registry, reservations, stats
from projections.base import Projection
from projections.expiry import Expiry
from tests.integration.projections.harness import Node, settings_for
from tests.integration.projections.oracle import actual_tables, assert_same, expected_tables
from tests.integration.projections.workload import Workload
from tests.support import eventually


def without_expiry_commands() -> list[Projection]:
    """Every projection, the expiry one projecting only: the log stays still once commands stop."""
    return [p if p.name != "expiry" else Expiry(None) for p in registry.all_projections()]


@pytest.mark.parametrize("seed", [1, 2])
async def test_read_models_follow_the_log_live(node: Node, seed: int) -> None:
    await node.start(without_expiry_commands())
    world = await Workload(node.bus, seed).run(400)
    assert world.accepted > 200
    await eventually(node.caught_up, what="projections to catch up")
    assert_same(await actual_tables(node.pool), await expected_tables(node.store))


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
async def test_read_models_catch_up_from_behind_in_batches(own_database_url: str, batch_size: int) -> None:
    node = await Node.open(own_database_url, settings_for(own_database_url, projection_batch_size=batch_size))
    try:
        await Workload(node.bus, seed=batch_size).run(300)
        await node.start(without_expiry_commands())
        await eventually(node.caught_up, what="projections to catch up")
        assert_same(await actual_tables(node.pool), await expected_tables(node.store))
    finally:
        await node.close()


async def test_reads_count_due_reservations_as_expired_before_the_expiry_is_recorded(node: Node) -> None:
    """No expiry process runs here: the figures change with the clock alone."""
    await node.start(without_expiry_commands())
    wallet_id, reservation_id = uuid4(), uuid4()
    repo = node.bus.repository
    for decide in (
        lambda ctx: wallets.open_wallet(repo, ctx, wallet_id, "alice", "USD"),
        lambda ctx: wallets.credit(repo, ctx, wallet_id, 1000, "seed", None),
        lambda ctx: wallets.reserve(repo, ctx, wallet_id, 300, 60, None, reservation_id),
    ):
        position = await node.on_wallet(wallet_id, decide)
    await eventually(node.caught_up)
    assert position
    now, later = datetime.now(UTC), datetime.now(UTC) + timedelta(seconds=61)

    _, wallet = await balances.get_wallet(node.pool, wallet_id, now)
    assert wallet is not None
    assert (wallet["reserved"], wallet["available"], len(wallet["reservations"])) == (300, 700, 1)
    _, wallet = await balances.get_wallet(node.pool, wallet_id, later)
    assert wallet is not None
    assert (wallet["reserved"], wallet["available"], wallet["reservations"]) == (0, 1000, [])
    _, page = await balances.list_wallets(node.pool, "alice", None, 10, later)
    assert page[0]["available"] == 1000

    _, found = await reservations.get_reservation(node.pool, reservation_id, now)
    assert found is not None and found["status"] == "open"
    _, found = await reservations.get_reservation(node.pool, reservation_id, later)
    assert found is not None and found["status"] == "expired"

    async with node.pool.acquire() as conn:
        _, figures = await stats.get_stats(conn, now)
        assert figures["currencies"]["USD"]["reserved"] == 300
        _, figures = await stats.get_stats(conn, later)
        assert figures["currencies"]["USD"]["reserved"] == 0
        assert figures["currencies"]["USD"]["credited"] == 1000
