"""A malformed event of a handled type stops the one projection that cannot read it, at that event;
the others carry on; status shows where and why; the runner keeps retrying with backoff. A database
that cannot apply an event for now (a lock timeout) blames no event."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import asyncpg
import pytest

from backend.commands import deposits, wallets
from backend.commands.context import SYSTEM, CommandContext
from backend.domain.registry import deposit_stream, wallet_stream
from backend.store.events import ANY, NewEvent
from projections import registry
from projections.rebuild import rebuild
from projections.runner import FAILED
from projections.service import connector
from projections.status import status
from tests.conftest import database_name
from tests.integration.projections.harness import Node
from tests.integration.projections.workload import SECRET
from tests.support import eventually


async def test_a_poison_event_stops_only_its_projection(node: Node) -> None:
    service = await node.start()
    repo, ctx = node.bus.repository, CommandContext(SYSTEM)
    wallet_id, deposit_id = uuid4(), uuid4()
    for streams, decide in (
        ([wallet_stream(wallet_id)], lambda c: wallets.open_wallet(repo, c, wallet_id, "alice", "USD")),
        ([deposit_stream(deposit_id)], lambda c: deposits.open_deposit(repo, c, deposit_id, wallet_id, "USD", SECRET)),
    ):
        await node.bus.execute(ctx, streams, decide)
    poison = await node.store.append_to(deposit_stream(deposit_id), ANY, [NewEvent(
        "DepositConfirming", {"confirmations": "many", "occurred_at": datetime.now(UTC).isoformat()},
        {"schema_version": 1})])
    later = await node.bus.execute(ctx, [wallet_stream(wallet_id)],
                                   lambda c: wallets.credit(repo, c, wallet_id, 500, "after the poison", None))

    async def others_past_it() -> bool:
        return all([await node.checkpoint(name) >= later.position for name in registry.names() if name != "deposits"])

    await eventually(others_past_it, what="the other projections to pass the poison event")
    found = {s.name: s for s in await status(node.pool, registry.names())}
    failed = found["deposits"]
    assert (failed.state, failed.failed_position, failed.checkpoint) == ("failed", poison.position,
                                                                         poison.position - 1)
    assert failed.error is not None and "confirmations" in failed.error
    assert all(s.state == "running" and s.error is None for name, s in found.items() if name != "deposits")
    assert service.runner("deposits").state == FAILED
    assert await node.pool.fetchval("select balance from wallet_balances where wallet_id = $1", wallet_id) == 500

    async def retried() -> bool:
        return (await status(node.pool, ["deposits"]))[0].failures >= 3

    await eventually(retried, what="the failed projection to retry")
    assert await node.checkpoint("deposits") == poison.position - 1

    with pytest.raises(Exception, match="confirmations"):
        await rebuild(connector(node.dsn, node.settings), registry.select(["deposits"]))
    assert not await node.pool.fetchval("select count(*) from pg_namespace where nspname like 'tally_rebuild_%'")
    assert await node.pool.fetchval("select status from deposits where deposit_id = $1", deposit_id) == "pending"


async def test_a_lock_timeout_while_applying_is_no_poison_event(node: Node) -> None:
    """The database, not the event: with an operator's lock_timeout and the read model's table locked, the
    balances runner's apply is cancelled (SQLSTATE 55P03) again and again. It ends its run and is
    restarted, and never records the event as failed; once the lock goes, it applies it."""
    admin = await asyncpg.connect(node.dsn)
    try:
        await admin.execute(f"alter database {database_name(node.dsn)} set lock_timeout = 100")
        service = await node.start()  # the runners' sessions open now, with the timeout
        wallet_id = uuid4()
        opened = await node.on_wallet(wallet_id, lambda c: wallets.open_wallet(node.bus.repository, c, wallet_id,
                                                                               "alice", "USD"))
        await eventually(lambda: checkpoint_at_least(node, "balances", opened), what="the wallet's balance row")
        async with admin.transaction():
            await admin.execute("lock table wallet_balances in access exclusive mode")
            credited = await node.on_wallet(wallet_id, lambda c: wallets.credit(node.bus.repository, c, wallet_id,
                                                                                 500, "behind a lock", None))
            runner, sessions = service.runner("balances"), set()

            def reconnected_twice() -> bool:  # a run ends with its connection: each retry has a new session
                sessions.add(runner.backend_pid)
                return len(sessions - {None}) >= 3

            await eventually(reconnected_twice, what="the runner to meet the lock timeout and start again")
            balances = (await status(node.pool, ["balances"]))[0]
            assert balances.state != FAILED and balances.failed_position is None and balances.error is None, balances
        await eventually(lambda: checkpoint_at_least(node, "balances", credited), what="the credit applied")
        assert (await status(node.pool, ["balances"]))[0].state == "running"
        assert await node.pool.fetchval("select balance from wallet_balances where wallet_id = $1", wallet_id) == 500
    finally:
        await admin.close()


async def checkpoint_at_least(node: Node, name: str, position: int) -> bool:
    return await node.checkpoint(name) >= position
