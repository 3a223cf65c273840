"""A runner that keeps up lets PROJECTION_APPLY_INTERVAL_S pass after a batch it applied before the next:
an event that follows a batch closely waits for the interval to run out (then it is applied), while a
runner that is behind applies its full batches one after another without waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from uuid import uuid4

from backend.commands import wallets
from backend.commands.bus import Decision
from backend.commands.context import CommandContext
from projections.balances import Balances
from tests.integration.projections.harness import Node, settings_for
from tests.support import eventually

INTERVAL_S = 1.0


async def test_an_event_right_after_a_batch_waits_for_the_interval(own_database_url: str) -> None:
    node = await Node.open(own_database_url, settings_for(own_database_url, projection_apply_interval_s=INTERVAL_S))
    try:
        runner = (await node.start([Balances()])).runner("balances")
        await eventually(lambda: runner.state == "leading", what="the runner to lead")
        wallet_id, repo = uuid4(), node.bus.repository

        opened = await node.on_wallet(wallet_id, lambda ctx: wallets.open_wallet(repo, ctx, wallet_id, "alice", "USD"))
        await eventually(lambda: runner.checkpoint >= opened, timeout=INTERVAL_S / 2,
                         what="the first event after a quiet spell to be applied at once")
        credited = await node.on_wallet(wallet_id, lambda ctx: wallets.credit(repo, ctx, wallet_id, 5, "c1", None))
        await asyncio.sleep(INTERVAL_S / 5)
        assert runner.checkpoint < credited, "the next batch began before the interval ran out"
        await eventually(lambda: runner.checkpoint >= credited, timeout=5 * INTERVAL_S,
                         what="the paced event to be applied once the interval is over")
    finally:
        await node.close()


async def test_a_runner_behind_applies_full_batches_without_waiting(own_database_url: str) -> None:
    settings = settings_for(own_database_url, projection_apply_interval_s=INTERVAL_S, projection_batch_size=2)
    node = await Node.open(own_database_url, settings)
    try:
        wallet_id, repo = uuid4(), node.bus.repository

        def credit(i: int) -> Callable[[CommandContext], Awaitable[Decision]]:
            return lambda ctx: wallets.credit(repo, ctx, wallet_id, 1, f"c{i}", None)

        last = await node.on_wallet(wallet_id, lambda ctx: wallets.open_wallet(repo, ctx, wallet_id, "alice", "USD"))
        for i in range(9):
            last = await node.on_wallet(wallet_id, credit(i))
        assert await node.pool.fetchval("select count(*) from events") == last == 10
        # Five full batches of two: paced, they would take four intervals or more.
        runner = (await node.start([Balances()])).runner("balances")
        await eventually(lambda: runner.checkpoint >= last, timeout=2.5 * INTERVAL_S,
                         what="the runner to catch up in full batches, one after another")
    finally:
        await node.close()
