"""A runner whose new events are all of types it ignores moves its checkpoint in memory at once (this
process's readers see it) and writes it to the table at most every idle interval, and once it falls
idle: the table catches up with the head without any further event."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from uuid import uuid4

from backend.commands import wallets
from backend.commands.bus import Decision
from backend.commands.context import CommandContext
from projections.deposits import Deposits
from tests.integration.projections.harness import Node, settings_for
from tests.support import eventually

INTERVAL_S = 0.5


async def test_idle_runner_writes_its_checkpoint_at_most_every_interval_and_when_idle(own_database_url: str) -> None:
    node = await Node.open(own_database_url, settings_for(own_database_url, projection_idle_checkpoint_s=INTERVAL_S))
    try:
        service = await node.start([Deposits()])  # wallet credits are not its concern
        runner = service.runner("deposits")
        await eventually(lambda: runner.state == "leading", what="the runner to lead")
        wallet_id, repo = uuid4(), node.bus.repository

        await node.on_wallet(wallet_id, lambda ctx: wallets.open_wallet(repo, ctx, wallet_id, "alice", "USD"))
        await eventually(lambda: runner.checkpoint > 0, what="the first step")
        writes_before, started = runner.checkpoint_writes, time.monotonic()
        last = 0

        def credit(i: int) -> Callable[[CommandContext], Awaitable[Decision]]:
            return lambda ctx: wallets.credit(repo, ctx, wallet_id, 1, f"c{i}", None)

        def readers_see(position: int) -> Callable[[], bool]:
            return lambda: service.watcher.known.get("deposits", 0) >= position

        for i in range(40):  # one append, and one step of the runner, at a time
            last = await node.on_wallet(wallet_id, credit(i))
            await eventually(readers_see(last),
                             what="this process's readers to see the runner's position")
        elapsed = time.monotonic() - started
        assert runner.checkpoint_writes - writes_before <= elapsed / INTERVAL_S + 2
        assert await node.checkpoint("deposits") <= runner.checkpoint == last

        await eventually(lambda: _position_is(node, last), timeout=5 * INTERVAL_S,
                         what="the table to reach the head once the runner falls idle")
    finally:
        await node.close()


async def _position_is(node: Node, position: int) -> bool:
    return await node.checkpoint("deposits") == position
