"""Aggregates through the real store: save, load (cache, snapshot + tail), conflicts, time travel."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from backend.domain import Wallet
from backend.domain.closed import AppendOnlyMap
from backend.store.event_store import EventStore
from backend.store.events import WrongExpectedVersion
from backend.store.repository import AggregateNotFound, Repository

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def state(wallet: Wallet) -> dict[str, object]:
    return {k: v for k, v in vars(wallet).items() if k != "_pending_events"}


async def test_save_and_load_round_trip(store: EventStore) -> None:
    repo = Repository(store)
    wallet = Wallet.open(uuid.uuid4(), "alice", "USD", NOW)
    wallet.credit(1000, "topup", NOW)
    wallet.lock(uuid.uuid4(), 300, "escrow", NOW)
    wallet.reserve(uuid.uuid4(), 200, NOW + timedelta(minutes=5), NOW)
    result = await repo.save(wallet, metadata={"request_id": "r1"})
    assert result.streams[0].version == 4

    fresh = Repository(store)  # no cache
    loaded = await fresh.get(Wallet, wallet.id)
    assert state(loaded) == state(wallet)
    [first, *_] = await store.read_stream(f"wallet-{wallet.id}")
    assert first.type == "WalletOpened"
    assert first.metadata == {"request_id": "r1", "schema_version": 1}
    assert first.data["occurred_at"] == NOW.isoformat()


async def test_missing_aggregate(store: EventStore) -> None:
    repo = Repository(store)
    assert await repo.find(Wallet, uuid.uuid4()) is None
    with pytest.raises(AggregateNotFound):
        await repo.get(Wallet, uuid.uuid4())


async def test_stale_copy_conflicts_and_cache_sees_other_writers(store: EventStore) -> None:
    one, two = Repository(store), Repository(store)
    wallet = Wallet.open(uuid.uuid4(), "bob", "EUR", NOW)
    await one.save(wallet)
    a = await one.get(Wallet, wallet.id)
    b = await two.get(Wallet, wallet.id)
    a.credit(10, "a", NOW)
    await one.save(a)
    b.credit(20, "b", NOW)
    with pytest.raises(WrongExpectedVersion):
        await two.save(b)
    # two's cache is stale, but a load applies the tail and sees one's write
    assert (await two.get(Wallet, wallet.id)).balance == 10


async def test_failed_command_does_not_pollute_the_cache(store: EventStore) -> None:
    repo = Repository(store)
    wallet = Wallet.open(uuid.uuid4(), "carol", "USD", NOW)
    wallet.credit(100, "x", NOW)
    await repo.save(wallet)
    loaded = await repo.get(Wallet, wallet.id)
    loaded.debit(60, "y", NOW)  # mutated in memory, never saved
    again = await repo.get(Wallet, wallet.id)
    assert (again.balance, again.version) == (100, 2)


async def test_snapshots_are_only_a_cache(store: EventStore, pool: asyncpg.Pool) -> None:
    repo = Repository(store, snapshot_every=5)
    wallet = Wallet.open(uuid.uuid4(), "dave", "USD", NOW)
    await repo.save(wallet)
    for i in range(12):
        loaded = await repo.get(Wallet, wallet.id)
        loaded.credit(10 + i, f"c{i}", NOW)
        if i % 3 == 0:
            loaded.lock(uuid.uuid4(), 5, "hold", NOW)
        await repo.save(loaded)
    stream = f"wallet-{wallet.id}"
    versions = [r["version"] for r in await pool.fetch(
        "select version from snapshots where stream_id = $1 order by version", stream)]
    assert len(versions) >= 2  # 13 events with a snapshot every 5

    from_snapshot = await Repository(store).get(Wallet, wallet.id)
    await pool.execute("delete from snapshots where stream_id = $1", stream)
    from_events = await Repository(store).get(Wallet, wallet.id)
    assert state(from_snapshot) == state(from_events)


async def test_snapshots_keep_a_long_past_and_ignore_an_older_class_version(
    store: EventStore, pool: asyncpg.Pool
) -> None:
    """70 closed locks (more than one AppendOnlyMap level) survive a snapshot; a snapshot written by
    an older Wallet (class_version 1, plain dicts) is skipped and the stream replayed instead."""
    repo = Repository(store, snapshot_every=25)
    wallet = Wallet.open(uuid.uuid4(), "fay", "USD", NOW)
    wallet.credit(1000, "seed", NOW)
    await repo.save(wallet)
    for _ in range(35):
        loaded = await repo.get(Wallet, wallet.id)
        lock_id = uuid.uuid4()
        loaded.lock(lock_id, 5, "hold", NOW)
        loaded.release(lock_id, NOW)
        await repo.save(loaded)
    stream = f"wallet-{wallet.id}"
    from_snapshot = await Repository(store).get(Wallet, wallet.id)
    assert isinstance(from_snapshot.closed_locks, AppendOnlyMap) and len(from_snapshot.closed_locks) == 35
    await pool.execute("delete from snapshots where stream_id = $1", stream)
    from_events = await Repository(store).get(Wallet, wallet.id)
    assert state(from_snapshot) == state(from_events)

    old = {"class_version": 1, "state": {"owner": "fay", "currency": "USD", "balance": 1,
                                         "closed_locks": {"$map": []}}}
    await pool.execute("insert into snapshots (stream_id, version, type, state) values ($1, $2, $3, $4)",
                             stream, from_events.version, "Wallet", old)
    assert state(await Repository(store).get(Wallet, wallet.id)) == state(from_events)


async def test_state_as_of_a_position(store: EventStore) -> None:
    repo = Repository(store)
    wallet = Wallet.open(uuid.uuid4(), "erin", "USD", NOW)
    wallet.credit(100, "a", NOW)
    first = await repo.save(wallet)
    wallet.debit(30, "b", NOW)
    await repo.save(wallet)
    then, position = await repo.as_of(Wallet, wallet.id, position=first.position)
    assert then is not None and then.balance == 100 and position == first.position
    now, _ = await repo.as_of(Wallet, wallet.id)
    assert now is not None and now.balance == 70


def test_clone_is_independent_of_the_original() -> None:
    from backend.store.repository import clone

    wallet = Wallet.open(uuid.uuid4(), "zed", "USD", NOW)
    wallet.credit(500, "a", NOW)
    lock_id = uuid.uuid4()
    wallet.lock(lock_id, 100, "l", NOW)
    wallet.reserve(uuid.uuid4(), 50, NOW + timedelta(minutes=1), NOW)
    wallet.collect_events()
    copy = clone(wallet)
    assert state(copy) == state(wallet)
    copy.release(lock_id, NOW)
    copy.reserve(uuid.uuid4(), 10, NOW + timedelta(minutes=1), NOW)
    assert wallet.locks == {lock_id: 100} and len(wallet.reservations) == 1 and wallet.closed_locks == {}
    assert wallet.version == 4 and copy.version > wallet.version


async def test_following_the_log_folds_into_the_cache_and_leaves_copies_handed_out_alone(store: EventStore) -> None:
    """Another process's events fold into the cached wallet itself (with several workers, every foreign
    event does): a copy handed out before keeps its state; an event that cannot be applied drops the
    cached wallet, and the next load reads the store."""
    mine, theirs = Repository(store), Repository(store)
    wallet = Wallet.open(uuid.uuid4(), "carol", "USD", NOW)
    wallet.credit(100, "seed", NOW)
    await mine.save(wallet)
    head = await store.head()
    held = await mine.get(Wallet, wallet.id)
    other = await theirs.get(Wallet, wallet.id)
    other.debit(30, "theirs", NOW)
    await theirs.save(other)
    events = await store.read_all(head)
    await mine.follow_log(head, events, events[-1].position)
    assert held.balance == 100 and held.version == 2
    assert (await mine.get(Wallet, wallet.id)).balance == 70

    head = events[-1].position
    other = await theirs.get(Wallet, wallet.id)
    other.debit(20, "theirs", NOW)
    await theirs.save(other)
    [followed] = await store.read_all(head)
    broken = type(followed)(**{**{f: getattr(followed, f) for f in followed.__slots__}, "data": {"nonsense": 1}})
    await mine.follow_log(head, [broken], broken.position)
    assert (await mine.get(Wallet, wallet.id)).balance == 50  # dropped, then read again from the store
