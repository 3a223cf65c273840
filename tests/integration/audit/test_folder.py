"""The background folder: one leader among several, the other taking over when it goes; an on-demand
fold racing the leader folds every batch once; the stored tree is the RFC tree of the log."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import uuid
from pathlib import Path

import asyncpg
import pytest

from backend.audit import tree_store
from backend.audit.folder import TASK, Folder
from backend.audit.merkle import MemoryTree, leaf_hash
from backend.audit.signing import Checkpoint, Signer, keygen
from backend.store.listener import Listener
from backend.supervisor import Supervisor
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
    supervisor = Supervisor()
    jobs = {folder: supervisor.spawn(f"{TASK}-{n}", folder.run, serves=False) for n, folder in enumerate(folders)}
    try:
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

        await supervisor.stop(jobs[leader])
        await eventually(lambda: other.leading, what="the other to take over")
        more = await fill_log(own_pool, streams=3, versions=3, seed=2)
        async with own_pool.acquire() as conn:  # an on-demand fold racing the new leader
            await tree_store.catch_up(conn, log.events + more.events, 4)
        await eventually(lambda: folded(log.events + more.events), what="the new leader to fold the rest")
        assert await stored_tree_is_the_log(own_pool) == log.events + more.events
    finally:
        await supervisor.close()
        await listener.close()


async def test_a_folder_that_loses_its_connection_is_restarted_and_leads_again(
        own_database_url: str, own_pool: asyncpg.Pool) -> None:
    """Under the process's Supervisor, as serve runs it: a restart it counts, with its short backoff."""
    listener = Listener(own_database_url, poll_interval_s=0.2)
    await listener.start()
    folder = Folder(connector(own_database_url, make_settings(own_database_url), durable_commits=False), listener,
                    signer=None, checkpoint_s=60, batch_size=50, standby_retry_s=0.1, fold_interval_s=0.05)
    supervisor = Supervisor(min_delay_s=0.05, settle_s=0.2)
    supervisor.spawn(TASK, folder.run, serves=False)

    def restarted(times: int) -> bool:
        return supervisor.restarts()[TASK] == times

    try:
        first = await fill_log(own_pool, streams=2, versions=2)
        await eventually(lambda: folder.leading, what="the folder to lead")
        for outage in (1, 2):  # the second comes after the first has settled: its backoff starts short again
            killed = await own_pool.fetchval(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity where application_name = $1 "
                "and datname = current_database() and state is not null", f"tally-{TASK}")
            assert killed >= 1
            await eventually(functools.partial(restarted, outage), what="the supervisor to restart it")
            await eventually(lambda: supervisor.tasks[TASK].consecutive_failures == 0 and folder.leading,
                             what="the folder to lead again")
        more = await fill_log(own_pool, streams=2, versions=2, seed=2)

        async def folded() -> bool:
            return await tree_store.tree_size(own_pool) == first.events + more.events

        await eventually(folded, what="the restarted folder to fold the rest")
        assert supervisor.restarts() == {TASK: 2}
        assert supervisor.stuck() == []
    finally:
        await supervisor.close()
        await listener.close()


async def test_an_on_demand_catch_up_is_bounded(own_pool: asyncpg.Pool) -> None:
    log = await fill_log(own_pool, streams=4, versions=5)
    async with own_pool.acquire() as conn:
        assert await tree_store.catch_up(conn, log.events, 3, max_batches=2) == 6
        assert await tree_store.catch_up(conn, log.events, 3) == log.events
        assert await tree_store.catch_up(conn, log.events + 5, 3) == log.events, "stops where the log ends"
    assert await stored_tree_is_the_log(own_pool) == log.events


async def test_folds_of_any_size_store_the_rfc_tree(own_pool: asyncpg.Pool) -> None:
    """Batches that end anywhere (inside a subtree, on a power of two, across several) give the same
    stored subtrees as the RFC's recursive definition."""
    log = await fill_log(own_pool, streams=30, versions=10)
    async with own_pool.acquire() as conn:
        size = 0
        for limit in (1, 1, 2, 3, 9, 16, 32, 1, 64, 100):
            folded_to, folded = await tree_store.fold(conn, limit)
            assert (folded_to, folded) == (size + limit, limit)
            size = folded_to
            assert await stored_tree_is_the_log(own_pool) == size
        assert await tree_store.fold(conn, 1000) == (log.events, log.events - size)
        assert await tree_store.fold(conn, 1000) == (log.events, 0)
    assert await stored_tree_is_the_log(own_pool) == log.events


async def test_the_tree_stops_before_a_gap_in_the_log(own_pool: asyncpg.Pool,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    log = await fill_log(own_pool, streams=3, versions=2)
    row = await own_pool.fetchrow("select * from events where position = $1", log.events)
    assert row is not None
    await own_pool.execute(  # position head + 2: head + 1 is missing
        "insert into events (position, stream_id, version, type, data, metadata, event_id, recorded_at, hash)"
        " values ($1, $2, $3, $4, $5, $6, $7, $8, $9)", log.events + 2, row["stream_id"], row["version"] + 1,
        row["type"], row["data"], row["metadata"], uuid.uuid4(), row["recorded_at"], row["hash"])
    caplog.set_level(logging.ERROR, logger="backend.audit.tree_store")
    async with own_pool.acquire() as conn:
        assert await tree_store.fold(conn, 100) == (log.events, log.events)
        assert await tree_store.fold(conn, 100) == (log.events, 0)
    gaps = [r for r in caplog.records if r.getMessage() == "the log skips positions: the tree stops before the gap"]
    assert [(r.expected, r.found) for r in gaps] == [(log.events + 1, log.events + 2)] * 2  # type: ignore[attr-defined]
    sizes = await own_pool.fetch("select level, count(*) from merkle_nodes group by level order by level")
    assert [(r[0], r[1]) for r in sizes] == [(0, 6), (1, 3), (2, 1)]


async def test_a_fold_over_a_missing_subtree_fails_and_stores_nothing(own_pool: asyncpg.Pool) -> None:
    await fill_log(own_pool, streams=4, versions=2)
    async with own_pool.acquire() as conn:
        assert await tree_store.fold(conn, 4) == (4, 4)
        await conn.execute("update merkle_state set tree_size = 6")  # leaves 4 and 5 were never folded
        with pytest.raises(asyncpg.DataCorruptedError, match="lacks a subtree of level 1"):
            await tree_store.fold(conn, 4)
    assert await tree_store.tree_size(own_pool) == 6
    assert await own_pool.fetchval("select count(*) from merkle_nodes") == 7


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
    supervisor = Supervisor()
    supervisor.spawn(TASK, folder.run, serves=False)
    try:
        async def signed_twice() -> bool:
            return len(await tree_store.checkpoints(own_pool, None, 10)) >= 2

        await eventually(signed_twice, what="two checkpoints")
    finally:
        await supervisor.close()
        await listener.close()
    oldest = (await tree_store.checkpoints(own_pool, None, 100))[-1]
    assert oldest["tree_size"] == 1, "the first is signed after the first batch, not once the log is folded"
    assert 1 < log.events
    for served in await tree_store.checkpoints(own_pool, None, 100):
        checkpoint = Checkpoint.from_dict(served)
        assert checkpoint.verify(signer.public)
        assert checkpoint.root_hash == await tree_store.root(own_pool, checkpoint.tree_size)


async def test_checkpoints_signed_while_others_fold_never_go_backwards(own_pool: asyncpg.Pool,
                                                                       tmp_path: Path) -> None:
    """The leader's periodic checkpoint and an on-demand one can race: a checkpoint signed later (a
    larger id, a later timestamp) must never cover fewer events than an earlier one, or an auditor
    holding both would be told the log shrank."""
    await fill_log(own_pool, streams=10, versions=8)
    keygen(tmp_path / "key.pem")
    signer = Signer.from_file(tmp_path / "key.pem")

    async def fold_and_sign() -> None:
        async with own_pool.acquire() as conn:
            for _ in range(20):
                await tree_store.fold(conn, 1)
                await tree_store.sign(conn, signer)

    await asyncio.gather(*(fold_and_sign() for _ in range(4)))
    async with own_pool.acquire() as conn:
        rows = await conn.fetch("select tree_size, signed_at from audit_checkpoints order by id")
    assert len(rows) == 80
    for earlier, later in itertools.pairwise(rows):
        assert later["tree_size"] >= earlier["tree_size"] and later["signed_at"] >= earlier["signed_at"], \
            [tuple(r) for r in rows]
