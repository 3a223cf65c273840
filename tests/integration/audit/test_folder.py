"""The background folder: one leader among several, the other taking over when it goes; an on-demand
fold racing the leader folds every batch once; the stored tree is the RFC tree of the log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from backend.audit import tree_store
from backend.audit.folder import Folder
from backend.audit.merkle import MemoryTree, leaf_hash
from backend.audit.signing import Checkpoint, Signer, keygen
from backend.store.listener import Listener
from projections.service import connector
from tests.conftest import make_settings
from tests.integration.audit.support import fill_log
from tests.support import eventually


async def stored_tree_is_the_log(pool: asyncpg.Pool) -> int:
    rows = await pool.fetch("select position, hash from events order by position")
    tree = MemoryTree([leaf_hash(r[0], bytes(r[1])) for r in rows])
    size = await tree_store.tree_size(pool)
    stored = {(r[0], r[1]): bytes(r[2]) for r in await pool.fetch("select level, index, hash from merkle_nodes")}
    assert len(stored) == 2 * size - bin(size).count("1")
    assert all(value == tree.subtree(node) for node, value in stored.items())
    assert await tree_store.root(pool, size) == tree.root(size)
    return size


async def test_one_folder_leads_and_another_takes_over(own_database_url: str, own_pool: asyncpg.Pool) -> None:
    settings = make_settings(own_database_url)
    listener = Listener(own_database_url, poll_interval_s=0.2)
    await listener.start()
    folders = [Folder(connector(own_database_url, settings, durable_commits=False), listener, signer=None,
                      checkpoint_s=60, batch_size=7, standby_retry_s=0.1) for _ in range(2)]
    try:
        for folder in folders:
            folder.start()
        await eventually(lambda: any(f.leading for f in folders), what="a leader")
        await asyncio.sleep(0.3)  # the other has tried (and failed) to take the lock meanwhile
        assert sum(f.leading for f in folders) == 1
        leader = next(f for f in folders if f.leading)
        other = next(f for f in folders if not f.leading)

        log = await fill_log(own_pool, streams=5, versions=4)

        async def folded(count: int) -> bool:
            return await tree_store.tree_size(own_pool) == count

        await eventually(lambda: folded(log.events), what="the leader to fold the log")
        assert await stored_tree_is_the_log(own_pool) == log.events

        await leader.stop()
        await eventually(lambda: other.leading, what="the other to take over")
        more = await fill_log(own_pool, streams=3, versions=3, seed=2)
        async with own_pool.acquire() as conn:  # an on-demand fold racing the new leader
            await tree_store.catch_up(conn, log.events + more.events, 4)
        await eventually(lambda: folded(log.events + more.events), what="the new leader to fold the rest")
        assert await stored_tree_is_the_log(own_pool) == log.events + more.events
    finally:
        for folder in folders:
            await folder.stop()
        await listener.close()


async def test_an_on_demand_catch_up_is_bounded(own_pool: asyncpg.Pool) -> None:
    log = await fill_log(own_pool, streams=4, versions=5)
    async with own_pool.acquire() as conn:
        assert await tree_store.catch_up(conn, log.events, 3, max_batches=2) == 6
        assert await tree_store.catch_up(conn, log.events, 3) == log.events
        assert await tree_store.catch_up(conn, log.events + 5, 3) == log.events, "stops where the log ends"
    assert await stored_tree_is_the_log(own_pool) == log.events


async def test_checkpoints_are_signed_on_time_while_the_folder_catches_up(own_database_url: str,
                                                                           own_pool: asyncpg.Pool,
                                                                           tmp_path: Path) -> None:
    keygen(tmp_path / "key.pem")
    signer = Signer.from_file(tmp_path / "key.pem")
    log = await fill_log(own_pool, streams=4, versions=3)
    listener = Listener(own_database_url, poll_interval_s=0.2)
    await listener.start()
    folder = Folder(connector(own_database_url, make_settings(own_database_url), durable_commits=False), listener,
                    signer=signer, checkpoint_s=0.001, batch_size=1)
    try:
        folder.start()

        async def signed_twice() -> bool:
            return len(await tree_store.checkpoints(own_pool, None, 10)) >= 2

        await eventually(signed_twice, what="two checkpoints")
    finally:
        await folder.stop()
        await listener.close()
    oldest = (await tree_store.checkpoints(own_pool, None, 100))[-1]
    assert oldest["tree_size"] == 1, "the first is signed after the first batch, not once the log is folded"
    assert 1 < log.events
    for served in await tree_store.checkpoints(own_pool, None, 100):
        checkpoint = Checkpoint.from_dict(served)
        assert checkpoint.verify(signer.public)
        assert checkpoint.root_hash == await tree_store.root(own_pool, checkpoint.tree_size)
