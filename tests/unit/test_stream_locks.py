"""Per-stream locks of the command bus: one holder per stream at a time, nothing left held after a
cancelled wait or a failing body, and no deadlock between commands naming the same streams in
different orders."""

from __future__ import annotations

import asyncio

import pytest

from backend.commands.locks import StreamLocks


async def test_one_holder_per_stream_and_other_streams_do_not_wait() -> None:
    locks = StreamLocks()
    inside: list[str] = []
    release = asyncio.Event()

    async def hold(name: str, streams: list[str]) -> None:
        async with locks.hold(streams):
            inside.append(name)
            await release.wait()

    first = asyncio.create_task(hold("first", ["wallet-a"]))
    second = asyncio.create_task(hold("second", ["wallet-a"]))
    other = asyncio.create_task(hold("other", ["wallet-b"]))
    await asyncio.sleep(0.01)
    assert inside == ["first", "other"]
    release.set()
    await asyncio.gather(first, second, other)
    assert inside == ["first", "other", "second"] and len(locks) == 0


async def test_a_cancelled_waiter_and_a_failing_body_leave_nothing_held() -> None:
    locks = StreamLocks()
    holding = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold(["wallet-b"]):
            holding.set()
            await release.wait()

    async def waiter() -> None:
        async with locks.hold(["wallet-b", "wallet-a"]):  # takes wallet-a (sorted first), then waits for b
            raise AssertionError("never entered")

    first = asyncio.create_task(holder())
    await holding.wait()
    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    async with asyncio.timeout(1):  # the wallet-a it had taken is free again, while b is still held
        async with locks.hold(["wallet-a"]):
            pass
    release.set()
    await first
    assert len(locks) == 0
    with pytest.raises(ValueError):
        async with locks.hold(["wallet-a", "wallet-b"]):
            raise ValueError("the command failed")
    assert len(locks) == 0
    async with asyncio.timeout(1):
        async with locks.hold(["wallet-a", "wallet-b"]):
            pass


async def test_opposite_orders_do_not_deadlock() -> None:
    locks = StreamLocks()
    done: list[int] = []

    async def command(i: int, streams: list[str]) -> None:
        async with locks.hold(streams):
            await asyncio.sleep(0)
            done.append(i)

    async with asyncio.timeout(5):
        await asyncio.gather(*(command(i, ["wallet-a", "wallet-b"] if i % 2 else ["wallet-b", "wallet-a"])
                               for i in range(50)))
    assert sorted(done) == list(range(50)) and len(locks) == 0
